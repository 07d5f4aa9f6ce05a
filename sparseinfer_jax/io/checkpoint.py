"""Checkpoint folder I/O: config.json with a `sparseinfer` block, params/ (an orbax checkpoint),
atomic writes.

Layout of a checkpoint directory (written by `convert`, read by `load`), format_version 4:
  config.json   the Hugging Face config fields plus
                "sparseinfer": {"format_version": 4, "alpha": [float per layer],
                                "dtype": "bfloat16" | "float32", "source": str}
  params/       an orbax checkpoint (io/params.py) of the model's params tree, one array per
                layer exactly as the model holds them (`layers/3/mlp/gate`, see io/names.py), so
                `load` restores each array straight into its place and sharding; plain orbax
                reads it too.
  tokenizer files copied from the source.
Older formats are refused with a request to re-convert: format 1 was an orbax PyTree of `[L, ...]`
stacked arrays, format 2 held the attention and LM head weights as `(in, out)` `kernel`s, format 3
was per-layer safetensors files.
"""

from __future__ import annotations

import contextlib
import errno
import json
import numbers
import os
import secrets
import shutil
from collections.abc import Iterator
from typing import Any

import jax.numpy as jnp

from sparseinfer_jax.errors import UserError
from sparseinfer_jax.io import params
from sparseinfer_jax.io.params import Path

FORMAT_VERSION = 4
# What each older format was, for the message that asks to re-convert.
OLD_FORMATS = {1: "stacked layers", 2: "attention weights stored as (in, out)",
               3: "per-layer safetensors files"}
CONFIG_FILE = "config.json"
PARAMS_DIR = "params"
BLOCK_KEY = "sparseinfer"
DTYPES = ("bfloat16", "float32")
# Room kept free beyond the checkpoint's own bytes (config, index, filesystem metadata).
SPACE_MARGIN = 16 * 2**20


def _damaged(path: str | os.PathLike, reason: str | None = None) -> str:
    why = "" if reason is None else f" ({reason})"
    return (f"the checkpoint {os.fspath(path)} is damaged{why}: convert the model again with "
            "sparseinfer-convert")


def _params_folder(path: str | os.PathLike) -> str:
    folder = os.path.join(path, PARAMS_DIR)
    if not os.path.isdir(folder):
        raise UserError(f"{path} has no {PARAMS_DIR}/ folder; {_damaged(path)}.")
    return folder


def restore_params(path: str | os.PathLike, abstract: dict[Path, Any], *, dtype: str
                   ) -> dict[Path, Any]:
    """The arrays of `path/params/` restored into `abstract` (`{params path:
    jax.ShapeDtypeStruct}` with shardings: see `params.restore`).

    The stored tree is checked against `abstract` first, from orbax's metadata: the same paths
    and shapes, floats stored as `dtype` (the block's) and the rest as uint32.
    """
    folder = _params_folder(path)

    def damaged(reason: str) -> UserError:
        return UserError(f"{_damaged(path, reason)}.")

    stored = params.stored(folder, error=damaged)
    for p, (shape, stored_dtype) in stored.items():
        name = ".".join(str(k) for k in p)
        want = abstract.get(p)
        if want is None or tuple(want.shape) != shape:
            what = "an unexpected tensor" if want is None else f"tensor of shape {list(shape)}"
            raise UserError(f"the checkpoint {path} has {what} '{name}' that its config.json "
                            "does not imply; convert the model again with sparseinfer-convert.")
        floating = jnp.issubdtype(want.dtype, jnp.floating)
        if stored_dtype.name != (dtype if floating else "uint32"):
            raise damaged(f"tensor '{name}' is stored as {stored_dtype}")
    missing = [p for p in abstract if p not in stored]
    if missing:
        name = ".".join(str(k) for k in missing[0])
        raise UserError(f"the checkpoint {path} has no tensor '{name}'; convert the model again "
                        "with sparseinfer-convert.")
    return params.restore(folder, abstract, error=damaged, found=stored)


def block_alpha(block: Any, where: str) -> Any:
    """The `alpha` of a `sparseinfer` block (None when absent), its types checked."""
    if block is None:
        return None
    if not isinstance(block, dict):
        raise UserError(f"{where} field '{BLOCK_KEY}' must be an object, got "
                        f"{type(block).__name__}; fix it or convert the model again.")
    alpha = block.get("alpha")
    items = alpha if isinstance(alpha, list) else [alpha]
    if alpha is not None and not all(isinstance(a, numbers.Real) and not isinstance(a, bool)
                                      for a in items):
        raise UserError(f"{where} field '{BLOCK_KEY}.alpha' must be a number or a list of "
                        f"numbers, got {alpha!r}; fix it or calibrate again.")
    return alpha


def sparseinfer_block(alpha: list[float], dtype: str, source: str) -> dict[str, Any]:
    """The `sparseinfer` block of a checkpoint's config.json."""
    assert dtype in DTYPES, dtype
    return {
        "format_version": FORMAT_VERSION,
        "alpha": [float(a) for a in alpha],
        "dtype": dtype,
        "source": source,
    }


def _sibling(path: str, tag: str) -> str:
    """A fresh hidden name next to `path` (made with plain open/mkdir, so the umask applies)."""
    head, tail = os.path.split(path)
    return os.path.join(head, f".{tail}.{tag}-{os.getpid()}-{secrets.token_hex(4)}")


def write_checkpoint_config(
    path: str | os.PathLike, hf_dict: dict[str, Any], block: dict[str, Any]
) -> None:
    """Writes `path/config.json` = `hf_dict` plus the `sparseinfer` block, atomically."""
    config = {k: v for k, v in hf_dict.items() if k != BLOCK_KEY}
    config[BLOCK_KEY] = block
    tmp = _sibling(os.path.join(path, CONFIG_FILE), "tmp")
    try:
        with open(tmp, "x") as f:
            json.dump(config, f, indent=2)
            f.write("\n")
        os.replace(tmp, os.path.join(path, CONFIG_FILE))
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def _read_config(path: str | os.PathLike) -> tuple[str, dict[str, Any]]:
    file = os.path.join(path, CONFIG_FILE)
    if not os.path.isfile(file):
        raise UserError(
            f"{path} has no {CONFIG_FILE}; point to a folder made by sparseinfer-convert."
        )
    try:
        with open(file) as f:
            config = json.load(f)
    except json.JSONDecodeError as e:
        raise UserError(f"{file} is not valid JSON ({e.msg} at line {e.lineno}).") from None
    except UnicodeDecodeError:
        raise UserError(f"{file} is not UTF-8 text; restore it or convert again.") from None
    if not isinstance(config, dict):
        raise UserError(f"{file} must hold a JSON object, got {type(config).__name__}.")
    return file, config


def read_checkpoint_config(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
    """Reads `path/config.json` -> (HF config dict without the block, `sparseinfer` block)."""
    file, config = _read_config(path)
    block = config.pop(BLOCK_KEY, None)
    if not isinstance(block, dict):
        raise UserError(
            f"{file} has no '{BLOCK_KEY}' block; convert the model with sparseinfer-convert first."
        )
    version = block.get("format_version")
    if version in OLD_FORMATS:
        raise UserError(
            f"{path} is a checkpoint of format {version} ({OLD_FORMATS[version]}, written by an "
            f"older sparseinfer-convert); this version reads format {FORMAT_VERSION}: convert the "
            "model again."
        )
    if version != FORMAT_VERSION:
        raise UserError(
            f"{file} has an unknown checkpoint format_version {version!r} (this version reads "
            f"{FORMAT_VERSION}); convert the model again with this version of sparseinfer-convert."
        )
    block_alpha(block, file)
    if block.get("dtype") not in DTYPES:
        raise UserError(f"{file} field '{BLOCK_KEY}.dtype' is {block.get('dtype')!r}, not one of "
                        f"{', '.join(DTYPES)}; {_damaged(path)}.")
    return config, block


def _has_version(path: str | os.PathLike) -> bool:
    try:
        block = _read_config(path)[1].get(BLOCK_KEY)
    except (UserError, OSError):
        return False
    return isinstance(block, dict) and "format_version" in block


def looks_converted(path: str | os.PathLike) -> bool:
    """True when `path` was written by sparseinfer-convert, in any format version: a params/
    folder and a config.json whose `sparseinfer` block has a format_version."""
    return os.path.isdir(os.path.join(path, PARAMS_DIR)) and _has_version(path)


def claims_converted(path: str | os.PathLike) -> bool:
    """True when `path` has either sign of a converted checkpoint (a params/ folder, a
    format_version): `load` then reads it as one, so damage is reported as damage."""
    return os.path.isdir(os.path.join(path, PARAMS_DIR)) or _has_version(path)


def is_checkpoint(path: str | os.PathLike) -> bool:
    """True when `path` is a checkpoint this version can read (see `looks_converted`)."""
    if not looks_converted(path):
        return False
    try:
        read_checkpoint_config(path)
    except UserError:
        return False
    return True


def check_output(out: str | os.PathLike, *, overwrite: bool = False) -> None:
    """Checks that a checkpoint can be written at `out`, before any work.

    A missing `out` (its nearest existing ancestor must be a folder) or an empty folder is fine.
    An existing checkpoint needs `overwrite`. Anything else (a file, a link, a folder that is not
    a converted checkpoint) is refused, `overwrite` or not: the tool never deletes what it did not
    write.
    """
    out = os.path.abspath(out)
    if os.path.islink(out) or (os.path.lexists(out) and not os.path.isdir(out)):
        raise UserError(f"{out} is a file, not a checkpoint folder; choose a new output folder "
                        "(or remove the file yourself).")
    if os.path.isdir(out):
        if not os.listdir(out):
            return
        if not looks_converted(out):
            raise UserError(f"{out} already exists and is not a checkpoint written by "
                            "sparseinfer-convert; choose a new output folder (--overwrite only "
                            "replaces a converted checkpoint).")
        if not overwrite:
            raise UserError(f"{out} already exists; pass --overwrite to replace it.")
        return
    parent = os.path.dirname(out)
    while not os.path.lexists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise UserError(f"{parent} is a file, so {out} cannot be created; choose an output "
                        "folder elsewhere.")


def _write_error(out: str, e: OSError) -> UserError:
    what = "the disk is full" if e.errno in (errno.ENOSPC, errno.EDQUOT) else (
        e.strerror or str(e))
    return UserError(f"writing {out} failed ({what}); nothing was written: free some space or "
                     "choose an output folder you can write to.")


@contextlib.contextmanager
def atomic_directory(out: str | os.PathLike, *, overwrite: bool = False,
                     size: int = 0) -> Iterator[str]:
    """Yields a temporary sibling folder of `out` that becomes `out` when the block succeeds.

    Before yielding: `check_output`, the parent folders made, the temporary folder created (so an
    unwritable place fails before any work) and at least `size` bytes free on its disk. On any
    exception (Ctrl-C included) the temporary folder and any parents it made are removed and
    `out` is left as it was; an OSError from the block becomes a one-line UserError. An existing
    `out` is replaced only after the new folder is complete.
    """
    out = os.path.abspath(out)
    check_output(out, overwrite=overwrite)
    made = os.path.dirname(out)
    while not os.path.lexists(os.path.dirname(made)):
        made = os.path.dirname(made)
    made = None if os.path.lexists(made) else made  # the top folder this call creates, if any
    tmp = _sibling(out, "tmp")
    try:
        try:
            os.makedirs(os.path.dirname(out), exist_ok=True)
            os.mkdir(tmp)
        except OSError as e:
            raise UserError(f"cannot create {out} ({e.strerror or e}); choose an output folder "
                            "you can write to.") from None
        free = shutil.disk_usage(tmp).free
        if free < size + SPACE_MARGIN:
            raise UserError(f"{os.path.dirname(out)} has {free / 2**30:.2f} GiB free but the "
                            f"checkpoint needs {(size + SPACE_MARGIN) / 2**30:.2f} GiB; free some "
                            "space or choose another output folder.")
        try:
            yield tmp
            if os.path.isdir(out) and os.listdir(out):
                old = _sibling(out, "old")
                os.replace(out, old)
                try:
                    os.replace(tmp, out)
                except BaseException:
                    os.replace(old, out)
                    raise
                shutil.rmtree(old)
            else:
                os.replace(tmp, out)
        except OSError as e:
            raise _write_error(out, e) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if made is not None:
            shutil.rmtree(made, ignore_errors=True)
        raise


def read_params(path: str | os.PathLike) -> dict[Any, Any]:
    """Every array of `path/params/` on the host (numpy), as saved: a nested dict in the model's
    per-layer layout (`{"layers": {i: {...}}, ...}`). For inspection; `load` restores them onto
    devices instead."""
    found = params.restore(_params_folder(path), None,
                           error=lambda reason: UserError(f"{_damaged(path, reason)}."))
    tree: dict[Any, Any] = {}
    for p, x in found.items():
        *parents, leaf = p
        node = tree
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = x
    return tree
