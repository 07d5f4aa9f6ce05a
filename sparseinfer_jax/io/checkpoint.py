"""Checkpoint folder I/O: config.json with a `sparseinfer` block, params/ (an orbax checkpoint),
atomic writes.

Layout of a checkpoint directory (written by `convert`, read by `load`), format_version 4:
  config.json   the Hugging Face config fields plus
                "sparseinfer": {"format_version": 4, "alpha": [float per layer],
                                "dtype": "bfloat16" | "float32", "source": str,
                                "predictor": "sign" | "signmag", "calibration": str}
                (`SparseInferBlock`, read and written only here)
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
import dataclasses
import errno
import json
import numbers
import os
import secrets
import shutil
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sparseinfer_jax.errors import UserError, check_writable_folder, size_text
from sparseinfer_jax.io import params
from sparseinfer_jax.io.jsonfile import read_json_object
from sparseinfer_jax.io.params import Path
from sparseinfer_jax.io.source import TOKENIZER_FILES
from sparseinfer_jax.model import quant
from sparseinfer_jax.model.config import PREDICTORS
from sparseinfer_jax.model.dtypes import STORED

FORMAT_VERSION = 4
# What each older format was, for the message that asks to re-convert.
OLD_FORMATS = {1: "stacked layers", 2: "attention weights stored as (in, out)",
               3: "per-layer safetensors files"}
CONFIG_FILE = "config.json"
PARAMS_DIR = "params"
BLOCK_KEY = "sparseinfer"
# What a checkpoint folder holds (`--overwrite` replaces only these).
CHECKPOINT_FILES = frozenset({CONFIG_FILE, PARAMS_DIR, *TOKENIZER_FILES})
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


def _stored_as(p: Path, want: Any, dtype: str) -> str:
    """The dtype a checkpoint stores the array `p` in: int8 weights and their float32 scales as
    such (`model/quant.py`), other floats as `dtype` (the block's), the sign bits as uint32."""
    if want.dtype == jnp.int8 or quant.is_scale(p):
        return jnp.dtype(want.dtype).name
    return dtype if jnp.issubdtype(want.dtype, jnp.floating) else "uint32"


def restore_params(path: str | os.PathLike, abstract: dict[Path, Any], *, dtype: str,
                   groups: Callable[[Path], Any] | None = None
                   ) -> dict[Path, Any] | Iterator[tuple[Path, Any]]:
    """The arrays of `path/params/` restored into `abstract` (`{params path:
    jax.ShapeDtypeStruct}` with shardings: see `params.restore`).

    The stored tree is checked against `abstract` first, from orbax's metadata: the same paths
    and shapes, floats stored as `dtype` (the block's), int8 weights and their scales as such
    and the rest as uint32; the restored floats must be finite. With `groups` (a path -> group
    key), an iterator of `(path, array)` restoring one group at a time (a load that quantises
    holds one layer in float at a time).
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
        if stored_dtype.name != _stored_as(p, want, dtype):
            raise damaged(f"tensor '{name}' is stored as {stored_dtype}")
    missing = [p for p in abstract if p not in stored]
    if missing:
        name = ".".join(str(k) for k in missing[0])
        raise UserError(f"the checkpoint {path} has no tensor '{name}'; convert the model again "
                        "with sparseinfer-convert.")

    def checked(arrays: dict[Path, Any]) -> dict[Path, Any]:
        bad = _non_finite(arrays)
        if bad is not None:
            raise damaged(f"tensor '{'.'.join(str(k) for k in bad)}' holds NaN or infinite "
                          "values")
        return arrays

    if groups is None:
        return checked(params.restore(folder, abstract, error=damaged, found=stored))
    by_group: dict[Any, dict[Path, Any]] = {}
    for p, want in abstract.items():
        by_group.setdefault(groups(p), {})[p] = want

    def each() -> Iterator[tuple[Path, Any]]:
        for group in by_group.values():
            yield from checked(params.restore(folder, group, error=damaged,
                                              found=stored)).items()

    return each()


def _non_finite(arrays: dict[Path, Any]) -> Path | None:
    """The first floating array holding a NaN or an infinity (the converter writes only finite
    ones, so such an array was overwritten since), or None; one compiled pass over the weights,
    on their devices."""
    names = [p for p, x in arrays.items() if jnp.issubdtype(x.dtype, jnp.floating)]
    if not names:
        return None
    finite = jax.jit(lambda xs: jnp.stack([jnp.isfinite(x).all() for x in xs]))(
        [arrays[p] for p in names])
    finite = np.asarray(finite.addressable_data(0)) if isinstance(finite, jax.Array) else finite
    return next((p for p, ok in zip(names, finite, strict=True) if not ok), None)


@dataclasses.dataclass(frozen=True)
class SparseInferBlock:
    """The `sparseinfer` block of a config.json: how to run this model sparsely.

    format_version: the checkpoint format (None in an HF folder's block);
    alpha: one number or one per layer (None: 1.0 per layer); dtype: the stored weights' dtype
    (a checkpoint's); source: where it was converted from; predictor: one of
    `config.PREDICTORS`; calibration: how the alphas were chosen (None: never calibrated, so
    sparse mode calibrates in memory at load); quantize: None, or "int8" when the linear
    weights are stored as int8 with per-row scales (`model/quant.py`); extra: any other keys,
    kept as they are (a converted copy carries everything its source's block chose).
    """

    format_version: int | None = None
    alpha: float | tuple[float, ...] | None = None
    dtype: str | None = None
    source: str | None = None
    predictor: str = "sign"
    calibration: str | None = None
    quantize: str | None = None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def is_calibrated(self) -> bool:
        """Whether the alphas were chosen (a "calibration" marker is present)."""
        return bool(self.calibration)

    @classmethod
    def from_json(cls, raw: Any, where: str) -> SparseInferBlock:
        """The block from its JSON value (None: the defaults), every field's type checked;
        `where` names the file for errors. Other keys go to `extra`."""
        if raw is None:
            return cls()
        if not isinstance(raw, dict):
            raise UserError(f"{where} field '{BLOCK_KEY}' must be an object, got "
                            f"{type(raw).__name__}; fix it or convert the model again.")
        alpha = raw.get("alpha")
        items = alpha if isinstance(alpha, list) else [alpha]
        if alpha is not None and not all(isinstance(a, numbers.Real) and not isinstance(a, bool)
                                          for a in items):
            raise UserError(f"{where} field '{BLOCK_KEY}.alpha' must be a number or a list of "
                            f"numbers, got {alpha!r}; fix it or calibrate again.")
        predictor = raw.get("predictor", "sign")
        if predictor not in PREDICTORS:
            raise UserError(f"{where} field '{BLOCK_KEY}.predictor' is {predictor!r}; use one of "
                            f"{', '.join(PREDICTORS)}.")
        if raw.get("quantize") is not None and raw["quantize"] not in quant.SCHEMES:
            raise UserError(f"{where} field '{BLOCK_KEY}.quantize' is {raw['quantize']!r}; this "
                            f"version reads {', '.join(quant.SCHEMES)}: convert the model again.")
        for key in ("dtype", "source", "calibration"):
            if raw.get(key) is not None and not isinstance(raw[key], str):
                raise UserError(f"{where} field '{BLOCK_KEY}.{key}' must be a string, got "
                                f"{raw[key]!r}; fix it or convert the model again.")
        return cls(
            format_version=raw.get("format_version"),
            alpha=tuple(float(a) for a in alpha) if isinstance(alpha, list) else alpha,
            dtype=raw.get("dtype"),
            source=raw.get("source"),
            predictor=predictor,
            calibration=raw.get("calibration"),
            quantize=raw.get("quantize"),
            extra={k: v for k, v in raw.items() if k not in _FIELDS},
        )

    def to_json(self) -> dict[str, Any]:
        """The JSON value: every field that is set (the predictor always)."""
        out = {**self.extra, **{name: getattr(self, name) for name in _FIELDS}}
        if isinstance(self.alpha, tuple):
            out["alpha"] = list(self.alpha)
        return {k: v for k, v in out.items() if v is not None}

    def replace(self, **changes: Any) -> SparseInferBlock:
        """A copy with `changes` (an alpha list becomes a tuple)."""
        if isinstance(changes.get("alpha"), list):
            changes["alpha"] = tuple(float(a) for a in changes["alpha"])
        return dataclasses.replace(self, **changes)


_FIELDS = tuple(f.name for f in dataclasses.fields(SparseInferBlock) if f.name != "extra")


def new_block(alpha: list[float], dtype: str, source: str,
              base: SparseInferBlock | None = None,
              quantize: str | None = None) -> SparseInferBlock:
    """The block of a freshly converted checkpoint: `base` (the source folder's block, whose
    choices it keeps: predictor, calibration marker, other keys) with this checkpoint's format,
    alphas, dtype, source and quantisation."""
    assert dtype in STORED, dtype
    return (base or SparseInferBlock()).replace(
        format_version=FORMAT_VERSION, alpha=tuple(float(a) for a in alpha), dtype=dtype,
        source=source, quantize=quantize)


def _sibling(path: str, tag: str) -> str:
    """A fresh hidden name next to `path` (made with plain open/mkdir, so the umask applies)."""
    head, tail = os.path.split(path)
    return os.path.join(head, f".{tail}.{tag}-{os.getpid()}-{secrets.token_hex(4)}")


def write_checkpoint_config(
    path: str | os.PathLike, hf_dict: dict[str, Any], block: SparseInferBlock
) -> None:
    """Writes `path/config.json` = `hf_dict` plus the `sparseinfer` block, atomically."""
    config = {k: v for k, v in hf_dict.items() if k != BLOCK_KEY}
    config[BLOCK_KEY] = block.to_json()
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


def check_config_writable(path: str | os.PathLike) -> None:
    """Raises UserError unless `write_checkpoint_config` can replace `path/config.json`: its
    folder takes new files, and the file itself can be renamed (an immutable or append-only file,
    or one in a sticky folder owned by another user, cannot), tried by renaming it away and back.
    Call it before the work whose result goes there."""
    check_writable_folder(path, f"the new {CONFIG_FILE}")
    file = os.path.join(path, CONFIG_FILE)
    probe = _sibling(file, "probe")
    try:
        os.rename(file, probe)
    except OSError as e:
        raise UserError(f"{file} cannot be replaced ({e.strerror}); make it writable (chattr -i, "
                        "chmod) or copy the checkpoint elsewhere.") from None
    finally:
        if os.path.lexists(probe):
            os.rename(probe, file)


def _read_config(path: str | os.PathLike) -> tuple[str, dict[str, Any]]:
    file = os.path.join(path, CONFIG_FILE)
    return file, read_json_object(
        file, missing="point to a folder made by sparseinfer-convert",
        remedy="restore it or convert again")


def read_checkpoint_config(
    path: str | os.PathLike,
) -> tuple[dict[str, Any], SparseInferBlock]:
    """Reads `path/config.json` -> (HF config dict without the block, its `sparseinfer` block)."""
    file, config = _read_config(path)
    raw = config.pop(BLOCK_KEY, None)
    if not isinstance(raw, dict):
        raise UserError(
            f"{file} has no '{BLOCK_KEY}' block; convert the model with sparseinfer-convert first."
        )
    version = raw.get("format_version")
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
    block = SparseInferBlock.from_json(raw, file)
    if block.dtype not in STORED:
        raise UserError(f"{file} field '{BLOCK_KEY}.dtype' is {block.dtype!r}, not one of "
                        f"{', '.join(STORED)}; {_damaged(path)}.")
    return config, block


def write_calibration(path: str | os.PathLike, alpha: list[float], predictor: str,
                      calibration: str) -> None:
    """Records chosen alphas, their predictor and how they were chosen in a checkpoint's
    config.json (the weights are untouched)."""
    hf, block = read_checkpoint_config(path)
    write_checkpoint_config(path, hf, block.replace(alpha=alpha, predictor=predictor,
                                                    calibration=calibration))


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
    if os.path.islink(out):
        raise UserError(f"{out} is a link (to {os.readlink(out)}); a checkpoint is written and "
                        "replaced as a folder: give the folder itself, or a new output folder.")
    if os.path.lexists(out) and not os.path.isdir(out):
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
        kept = sorted(set(os.listdir(out)) - CHECKPOINT_FILES)
        if kept:
            raise UserError(f"{out} also holds {', '.join(kept[:3])}"
                            f"{', ...' if len(kept) > 3 else ''}, which is not part of the "
                            "checkpoint and --overwrite would delete; move it out first.")
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


def _remove_replaced(old: str, out: str) -> None:
    """Removes the checkpoint `out` replaced (moved to `old`); one that cannot be removed is left
    where it is, and a warning says where (the new checkpoint is complete either way)."""
    try:
        shutil.rmtree(old)
    except OSError as e:
        warnings.warn(f"{out} is the new checkpoint, but the one it replaced could not be removed "
                      f"({e.strerror or e}); it is left at {old}.", RuntimeWarning, stacklevel=2)


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
            raise UserError(f"{os.path.dirname(out)} has {size_text(free)} free but the "
                            f"checkpoint needs {size_text(size + SPACE_MARGIN)}; free some "
                            "space or choose another output folder.")
        try:
            yield tmp
            if os.path.isdir(out) and os.listdir(out):
                if not overwrite:  # made meanwhile, by another run
                    raise UserError(f"{out} was created by another run meanwhile; pass "
                                    "--overwrite to replace it, or choose another output.")
                old = _sibling(out, "old")
                os.replace(out, old)
                try:
                    os.replace(tmp, out)
                except BaseException:
                    os.replace(old, out)
                    raise
                _remove_replaced(old, out)
            else:
                os.replace(tmp, out)
        except OSError as e:
            raise _write_error(out, e) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if made is not None:
            shutil.rmtree(made, ignore_errors=True)
        raise
