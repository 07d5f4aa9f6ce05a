"""Reading a Hugging Face Llama folder into the model's per-layer layout, one tensor at a time."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import numpy as np

from pallas_kernels.pack import pack_sign_bits_numpy
from sparseinfer_jax.errors import UserError
from sparseinfer_jax.io import names
from sparseinfer_jax.io.source import SafetensorsFolder, read_hf_config, resolve_source
from sparseinfer_jax.model import dtypes
from sparseinfer_jax.model.config import LlamaConfig, config_from_hf_dict

# Exponent bits of each float width: all set means NaN or infinity.
EXPONENT = {2: (np.uint16, 0x7F80), 4: (np.uint32, 0x7F800000)}


CHUNK = 2**24  # elements checked at a time, so the check's temporaries stay small


def numpy_dtype(dtype: str) -> np.dtype:
    """The numpy dtype a checkpoint stores under the name `dtype`."""
    return dtypes.lookup(dtype, allowed=dtypes.STORED)


def open_source(folder: str) -> tuple[dict[str, Any], LlamaConfig, SafetensorsFolder,
                                       dict[str, names.Target]]:
    """Reads config.json and every safetensors header; checks names and shapes against config."""
    hf = read_hf_config(folder)
    cfg = config_from_hf_dict(hf)
    reader = SafetensorsFolder(folder)
    targets = names.hf_targets(cfg)
    missing = [n for n in targets if n not in reader.shapes]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise UserError(f"{folder} has no tensor '{missing[0]}'{more}; the checkpoint is "
                        "incomplete or not a Llama model.")
    extra = [n for n in reader.shapes if n not in targets and not names.is_ignored(n, cfg)]
    if extra:
        more = f" and {len(extra) - 1} more" if len(extra) > 1 else ""
        raise UserError(f"{folder} has unexpected tensor '{extra[0]}'{more}; only plain Llama "
                        "checkpoints (no biases or extra modules) are supported.")
    for name, target in targets.items():
        if reader.shapes[name] != target.shape:
            raise UserError(f"tensor '{name}' in {reader.files[name]} has shape "
                            f"{list(reader.shapes[name])} but config.json implies "
                            f"{list(target.shape)}; the checkpoint and its config disagree.")
    return hf, cfg, reader, targets


def _check_finite(name: str, x: np.ndarray) -> None:
    """Refuses NaN or infinite weights (bfloat16 or float32 `x`), naming the HF tensor."""
    uint, mask = EXPONENT[x.dtype.itemsize]
    flat = x.reshape(-1).view(uint)
    bad = sum(int(np.count_nonzero((flat[k:k + CHUNK] & mask) == mask))
              for k in range(0, flat.size, CHUNK))
    if bad:
        raise UserError(f"tensor '{name}' has {bad} NaN or infinite values; the checkpoint is "
                        "damaged or its training diverged: download it again or fix it.")


Leaf = tuple[names.Path, np.ndarray]


def leaves(reader: SafetensorsFolder, cfg: LlamaConfig, dtype: np.dtype) -> Iterator[Leaf]:
    """Yields `(params path, array)` in `names.out_order`, one converted tensor at a time."""
    gate = None
    for path, _, target in names.out_order(cfg):
        if target is None:  # the sign bits of the gate just yielded
            yield path, pack_sign_bits_numpy(gate)
            continue
        x = reader.read(target.hf).astype(dtype, copy=False)
        if target.entry.transpose:
            x = np.ascontiguousarray(x.T)
        _check_finite(target.hf, x)
        if target.entry.path[1:] == names.SIGN_BITS_SOURCE:
            gate = x
        yield path, x
    del gate


def stream(src: str | os.PathLike, *, dtype: str = "bfloat16"
           ) -> tuple[dict[str, Any], LlamaConfig, Iterator[Leaf]]:
    """Opens a Hugging Face folder or hub id for conversion, as `load` does for HF folders.

    Every header, name and shape is checked here; the tensors are read and converted only as the
    iterator is consumed.

    Returns:
      (HF config dict, its LlamaConfig, iterator of `(params path, numpy array)` in the model's
      per-layer layout, see io/names.py).
    """
    np_dtype = numpy_dtype(dtype)
    hf, cfg, reader, _ = open_source(resolve_source(src))
    return hf, cfg, leaves(reader, cfg, np_dtype)


def convert_in_memory(src: str | os.PathLike, *, dtype: str = "bfloat16"
                      ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Converts a Hugging Face folder or hub id into host memory.

    Returns:
      (HF config dict, params: nested dict of numpy arrays in the model's per-layer layout).
    """
    hf, _, leaves = stream(src, dtype=dtype)
    tree: dict[Any, Any] = {}
    for path, x in leaves:
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = x
    return hf, tree
