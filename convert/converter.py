"""Streaming conversion of a Hugging Face Llama checkpoint into our checkpoint layout.

One tensor at a time: read, cast to the output dtype, transpose if the table says so, write into
its layer's slice of the stacked [L, ...] leaf. On disk the stacked leaves are np.memmap files in a
scratch folder inside the temporary output, handed to orbax without a copy and deleted before the
output is renamed into place. Measured by benchmarks/convert_memory.py: anonymous memory stays at a
few tensors whatever the model size; peak RSS is about the output size, the excess being pages of
the scratch mappings (page cache the kernel can write back and drop). The disk needs about twice
the output size while converting.
"""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Callable, Sequence
from typing import Any

import ml_dtypes
import numpy as np
from tqdm import tqdm

from convert import names
from convert.reader import TOKENIZER_FILES, SafetensorsFolder, resolve_source
from pallas_kernels.pack import pack_sign_bits_numpy
from sparseinfer_jax import checkpoint
from sparseinfer_jax.config import LlamaConfig, config_from_hf_dict, default_alpha, read_hf_config
from sparseinfer_jax.errors import UserError

DTYPES = {"bfloat16": np.dtype(ml_dtypes.bfloat16), "float32": np.dtype(np.float32)}
SCRATCH_DIR = "scratch"

Alloc = Callable[[tuple[str, ...], tuple[int, ...], np.dtype], np.ndarray]


def _np_dtype(dtype: str) -> np.dtype:
    if dtype not in DTYPES:
        raise UserError(f"dtype must be one of {', '.join(DTYPES)}, got '{dtype}'.")
    return DTYPES[dtype]


def _open_source(folder: str) -> tuple[dict[str, Any], LlamaConfig, SafetensorsFolder,
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


def _nest(flat: dict[tuple[str, ...], np.ndarray]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for path, value in flat.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return tree


def _fill(reader: SafetensorsFolder, cfg: LlamaConfig, targets: dict[str, names.Target],
          dtype: np.dtype, alloc: Alloc, *, bar_off: bool | None
          ) -> dict[tuple[str, ...], np.ndarray]:
    """Streams every HF tensor into leaves from `alloc(path, shape, dtype)`; returns them flat.

    `bar_off` is tqdm's `disable`: False always shows the progress bar, None only on a terminal.
    """
    leaves = {path: alloc(path, shape, dtype) for path, shape in names.out_shapes(cfg).items()}
    leaves[names.SIGN_BITS_PATH] = alloc(names.SIGN_BITS_PATH, names.sign_bits_shape(cfg),
                                         np.dtype(np.uint32))
    with tqdm(total=len(targets), unit="tensor", desc="converting", disable=bar_off) as bar:
        for name, x in reader.read(targets):
            target = targets[name]
            x = x.astype(dtype, copy=False)
            if target.entry.transpose:
                x = x.T
            if target.layer is None:
                leaves[target.entry.path][...] = x
            else:
                leaves[target.entry.path][target.layer] = x
            if target.entry.path == names.SIGN_BITS_SOURCE:
                leaves[names.SIGN_BITS_PATH][target.layer] = pack_sign_bits_numpy(x)
            bar.update()
    return leaves


def convert_in_memory(src: str | os.PathLike, *, dtype: str = "bfloat16"
                      ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Converts a Hugging Face folder or hub id into host memory, as `load` does for HF folders.

    Returns:
      (HF config dict, params: nested dict of numpy arrays in the checkpoint layout).
    """
    np_dtype = _np_dtype(dtype)
    hf, cfg, reader, targets = _open_source(resolve_source(src))
    # `load` converts HF folders this way: a bar only on a terminal keeps CLI errors to one line.
    leaves = _fill(reader, cfg, targets, np_dtype, lambda _, shape, dt: np.empty(shape, dt),
                   bar_off=None)
    return hf, _nest(leaves)


def _check_paths(src: str, out: str) -> None:
    src, out = os.path.realpath(src), os.path.realpath(out)
    if os.path.commonpath([src, out]) == src:
        raise UserError(f"the output {out} is inside the source folder {src}; choose an output "
                        "outside it (the source is never written).")
    if os.path.commonpath([src, out]) == out:
        raise UserError(f"the source folder {src} is inside the output {out}; choose another "
                        "output.")


def _alpha(alpha: float | Sequence[float] | None, layers: int) -> list[float]:
    if alpha is None:
        return default_alpha(layers)
    values = [float(alpha)] * layers if np.isscalar(alpha) else [float(a) for a in alpha]
    if len(values) != layers:
        raise UserError(f"alpha has {len(values)} values but the model has {layers} layers; give "
                        "one number or one per layer.")
    if not all(math.isfinite(a) and a > 0 for a in values):
        raise UserError(f"alpha must be positive and finite, got {alpha}.")
    return values


def convert(src: str | os.PathLike, out: str | os.PathLike, *, dtype: str = "bfloat16",
            overwrite: bool = False, alpha: float | Sequence[float] | None = None) -> str:
    """Converts a Hugging Face Llama folder (or hub id) into a checkpoint folder at `out`.

    Args:
      src: a local folder with config.json and safetensors, or a hub id `org/name`.
      out: the checkpoint folder to create; written to a temporary sibling, renamed at the end.
      dtype: "bfloat16" or "float32" for every weight (the sign bits are uint32).
      overwrite: replace an existing `out` (only once the new one is complete).
      alpha: the predictor's alpha, one number or one per layer; default: the source's calibrated
        `sparseinfer.alpha` when its config.json has one, else 1.0 per layer.

    Returns:
      The absolute path of `out`.
    """
    np_dtype = _np_dtype(dtype)
    out = os.path.abspath(out)
    checkpoint.check_output(out, overwrite=overwrite)
    folder = resolve_source(src)
    _check_paths(folder, out)
    hf, cfg, reader, targets = _open_source(folder)
    if alpha is None:  # keep alphas calibrated in the source folder (as `load` does)
        alpha = (hf.get("sparseinfer") or {}).get("alpha")
    alphas = _alpha(alpha, cfg.num_hidden_layers)
    source = os.path.abspath(folder) if os.path.isdir(os.fspath(src)) else os.fspath(src)
    with checkpoint.atomic_directory(out, overwrite=overwrite) as tmp:
        scratch = os.path.join(tmp, SCRATCH_DIR)
        os.makedirs(scratch)

        def memmap(path: tuple[str, ...], shape: tuple[int, ...], dt: np.dtype) -> np.ndarray:
            return np.memmap(os.path.join(scratch, ".".join(path)), dtype=dt, mode="w+",
                             shape=shape)

        # No flush: orbax reads through the same mappings, and the files are deleted unread.
        leaves = _fill(reader, cfg, targets, np_dtype, memmap, bar_off=False)  # notebooks too
        checkpoint.save_params(tmp, _nest(leaves))
        del leaves  # unmap before deleting the files
        shutil.rmtree(scratch)
        checkpoint.write_checkpoint_config(tmp, hf, checkpoint.sparseinfer_block(
            alphas, dtype, source))
        for file in TOKENIZER_FILES:
            if os.path.isfile(os.path.join(folder, file)):
                shutil.copy2(os.path.join(folder, file), os.path.join(tmp, file))
    return out

