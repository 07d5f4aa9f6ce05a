"""Checkpoint folder I/O: config.json with a `sparseinfer` block, params/ (orbax), atomic writes.

Layout of a checkpoint directory (written by `convert`, read by `load`):
  config.json   the Hugging Face config fields plus
                "sparseinfer": {"format_version": 1, "alpha": [float per layer],
                                "dtype": "bfloat16" | "float32", "source": str}
  params/       an orbax PyTree checkpoint of the nested dict of arrays (see convert/names.py)
  tokenizer files copied from the source.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import secrets
import shutil
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from sparseinfer_jax.errors import UserError

FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
PARAMS_DIR = "params"
BLOCK_KEY = "sparseinfer"
DTYPES = ("bfloat16", "float32")

# NumpyHandler deep-copies host arrays by default, which would hold the whole model in memory;
# the converter hands it np.memmap leaves it does not touch again, so the copy is pure waste.
# Uncompressed: zstd saves ~20% of disk on random bf16 but buffers the compressed chunks in memory
# until the commit (measured: anonymous memory grew by about the compressed size during the save),
# and every load would pay for decompression.
_REGISTRY = ocp.type_handlers.create_type_handler_registry(
    (np.ndarray, ocp.type_handlers.NumpyHandler(deepcopy_host_arrays=False)),
    (jax.Array, ocp.type_handlers.ArrayHandler()),
)


def _checkpointer() -> ocp.Checkpointer:
    handler = ocp.PyTreeCheckpointHandler(type_handler_registry=_REGISTRY, use_compression=False)
    return ocp.Checkpointer(handler)


def save_params(path: str | os.PathLike, params: dict[str, Any]) -> None:
    """Writes `params` (nested dict of numpy or jax arrays) to `path/params/` with orbax.

    Args:
      path: the checkpoint directory; `params/` inside it must not exist yet.
      params: nested dict of arrays; numpy leaves (np.memmap included) are written without a copy.
    """
    with _checkpointer() as ckpt:
        ckpt.save(os.path.abspath(os.path.join(path, PARAMS_DIR)), args=ocp.args.PyTreeSave(params))


def _is_float(dtype: Any) -> bool:
    return jnp.issubdtype(dtype, jnp.floating)


def restore_params(
    path: str | os.PathLike, *, shardings: Any = None, dtype: Any = None
) -> dict[str, Any]:
    """Reads `path/params/` straight onto devices.

    Args:
      path: the checkpoint directory.
      shardings: a nested dict holding every path of the params tree (extra entries, such as
        ones for arrays an older checkpoint lacks, are ignored), each leaf a
        `jax.sharding.Sharding`; None puts every array on the default device. Each device reads
        only its own shard.
      dtype: cast float weights to this dtype on read (None: keep the stored dtype); integer leaves
        (the packed sign bits) are never cast.

    Returns:
      The nested dict of `jax.Array`.
    """
    params_dir = os.path.abspath(os.path.join(path, PARAMS_DIR))
    if not os.path.isdir(params_dir):
        raise UserError(
            f"{path} has no {PARAMS_DIR}/ folder; convert the model with sparseinfer-convert first."
        )
    with _checkpointer() as ckpt:
        meta = ckpt.metadata(params_dir).item_metadata.tree
        if shardings is None:
            device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
            shardings = jax.tree.map(lambda _: device, meta)
        else:
            shardings = jax.tree_util.tree_map_with_path(
                lambda path, _: functools.reduce(lambda d, k: d[k.key], path, shardings), meta
            )

        def restore_args(m: Any, sharding: jax.sharding.Sharding) -> ocp.ArrayRestoreArgs:
            leaf_dtype = dtype if dtype is not None and _is_float(m.dtype) else m.dtype
            return ocp.ArrayRestoreArgs(sharding=sharding, dtype=leaf_dtype, global_shape=m.shape)

        args = jax.tree.map(restore_args, meta, shardings)
        target = jax.tree.map(
            lambda m, a: jax.ShapeDtypeStruct(m.shape, a.dtype, sharding=a.sharding), meta, args
        )
        return ckpt.restore(params_dir, args=ocp.args.PyTreeRestore(item=target, restore_args=args))


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


def read_checkpoint_config(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
    """Reads `path/config.json` -> (HF config dict without the block, `sparseinfer` block)."""
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
    block = config.pop(BLOCK_KEY, None)
    if not isinstance(block, dict):
        raise UserError(
            f"{file} has no '{BLOCK_KEY}' block; convert the model with sparseinfer-convert first."
        )
    if block.get("format_version") != FORMAT_VERSION:
        raise UserError(
            f"{file} has checkpoint format_version {block.get('format_version')}, this "
            f"version reads {FORMAT_VERSION}; convert the model again."
        )
    return config, block


def is_checkpoint(path: str | os.PathLike) -> bool:
    """True when `path` looks like a converted checkpoint (config.json with the block, params/)."""
    if not os.path.isdir(os.path.join(path, PARAMS_DIR)):
        return False
    try:
        read_checkpoint_config(path)
    except UserError:
        return False
    return True


def check_output(out: str | os.PathLike, *, overwrite: bool = False) -> None:
    """Refuses an existing `out` unless `overwrite` (and then only a real folder)."""
    if os.path.lexists(out):
        if not overwrite:
            raise UserError(f"{out} already exists; pass --overwrite to replace it.")
        if not os.path.isdir(out) or os.path.islink(out):
            raise UserError(
                f"{out} exists and is not a folder; remove it or choose another output."
            )


@contextlib.contextmanager
def atomic_directory(out: str | os.PathLike, *, overwrite: bool = False) -> Iterator[str]:
    """Yields a temporary sibling folder of `out` that becomes `out` when the block succeeds.

    On any exception the temporary folder is removed and `out` is left as it was. An existing `out`
    is refused unless `overwrite`, and then replaced only after the new folder is complete.
    """
    out = os.path.abspath(out)
    check_output(out, overwrite=overwrite)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = _sibling(out, "tmp")
    os.mkdir(tmp)
    try:
        yield tmp
        if os.path.lexists(out):
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
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
