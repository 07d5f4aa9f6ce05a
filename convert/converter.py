"""Streaming conversion of a Hugging Face Llama checkpoint into our checkpoint layout.

One tensor at a time: read, cast to the output dtype, transpose if the table says so, check it is
finite (io/hf.py), then hand it to the orbax writer (io/params.py), which writes a group of
arrays while the next group is converted, each array once, with no scratch copy. The output
needs its own size on disk (checked before any work) and memory for a few groups of tensors.
"""

from __future__ import annotations

import math
import os
import shutil
import sys
from collections.abc import Callable, Iterator, Sequence

import numpy as np
from tqdm import tqdm

from sparseinfer_jax.api.calibrate import calibrate_checkpoint
from sparseinfer_jax.errors import UserError
from sparseinfer_jax.io import checkpoint, names, params
from sparseinfer_jax.io.hf import Leaf, leaves, numpy_dtype, open_source
from sparseinfer_jax.io.source import TOKENIZER_FILES, resolve_source
from sparseinfer_jax.io.tokenizer import load_tokenizer
from sparseinfer_jax.model import quant
from sparseinfer_jax.model.config import LlamaConfig, default_alpha

# The `sparseinfer` keys the converter writes itself; every other key the source's block holds
# (the predictor, the calibration marker, ...) is the source's choice and is kept.


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


def _specs(cfg: LlamaConfig, dtype: np.dtype, quantize: str | None = None
           ) -> dict[names.Path, tuple]:
    """Every array the checkpoint holds, in write order: `{params path: (shape, dtype)}`."""
    if quantize is None:
        return {path: (shape, np.dtype(np.uint32) if target is None else dtype)
                for path, shape, target in names.out_order(cfg)}
    kinds = {}
    for path, shape, target in quant.layout(names.out_order(cfg)):
        kind = (np.int8 if quant.is_quantized(path) else np.float32 if quant.is_scale(path)
                else np.uint32 if target is None else dtype)
        kinds[path] = (shape, np.dtype(kind))
    return kinds


def _quantized(leaves: Iterator[Leaf], dtype: np.dtype) -> Iterator[Leaf]:
    """float32 `leaves` with the linear weights as int8 rows plus scales (`quant.quantize_leaves`:
    rounded once, from float32) and every other float array cast to `dtype`."""
    for path, x in quant.quantize_leaves(leaves):
        if x.dtype == np.float32 and not quant.is_scale(path):
            x = x.astype(dtype, copy=False)
        yield path, x


def _write_params(folder: str, count: int, leaves: Iterator[Leaf], progress: bool) -> None:
    """Writes every array of `leaves` once, into the orbax checkpoint `folder`."""
    with params.Writer(folder) as writer, tqdm(total=count, unit="tensor", desc="converting",
                                               disable=not progress) as bar:
        for path, x in leaves:
            writer.add(path, x)
            bar.update()
        writer.finish()


def convert(src: str | os.PathLike, out: str | os.PathLike, *, dtype: str = "bfloat16",
            overwrite: bool = False, alpha: float | Sequence[float] | None = None,
            calibrate: bool = True, progress: bool = True,
            say: Callable[[str], None] | None = None, quantize: str | None = None) -> str:
    """Converts a Hugging Face Llama folder (or hub id) into a checkpoint folder at `out`, and
    calibrates it, as `sparseinfer-convert` does.

    Everything is checked before any work: the output path (an existing `out` is replaced only
    when it is a checkpoint this tool wrote and `overwrite` is set), the source's config, tensor
    names and shapes, its tokenizer, and the free disk space. The checkpoint is written and
    calibrated in a temporary sibling folder that becomes `out` only when complete; on any
    failure (or Ctrl-C) the temporary folder is removed and `out` is left as it was.

    Args:
      src: a local folder with config.json and safetensors, or a hub id `org/name`.
      out: the checkpoint folder to create.
      dtype: "bfloat16" or "float32" for every weight (the sign bits are uint32).
      overwrite: replace an existing checkpoint at `out` (only once the new one is complete).
      alpha: the predictor's alpha, one number or one per layer; default: the source's calibrated
        `sparseinfer.alpha` when its config.json has one, else calibrated.
      calibrate: choose alpha per layer on the built-in text (recall 0.99) when neither `alpha`
        nor the source gives it (`api.calibrate.calibrate_checkpoint`); False leaves 1.0 per
        layer unmarked, so a sparse load calibrates in memory, with a warning.
      progress: progress bars (and the note that calibration starts) on stderr.
      say: called with the line that says how the checkpoint was calibrated, or why not;
        default: printed on stderr.
      quantize: None, or "int8": every linear weight stored as int8 with one float32 scale per
        row (`model/quant.py`), quantised from the source's values read as float32; the sign
        bits from the unquantised gate; embeddings and norms in `dtype`.

    The rest of the source's `sparseinfer` block (its predictor, its calibration marker) is kept,
    so the checkpoint decodes as the source does; a calibration marker is dropped when `alpha`
    replaces the alphas it describes.

    Returns:
      The absolute path of `out`.
    """
    np_dtype = numpy_dtype(dtype)
    quant.check(quantize)
    if not os.fspath(out).strip():
        raise UserError("the output path is empty; name the checkpoint folder to create.")
    out = os.path.abspath(out)
    checkpoint.check_output(out, overwrite=overwrite)
    folder = resolve_source(src)
    _check_paths(folder, out)
    if checkpoint.looks_converted(folder):
        raise UserError(f"{folder} is a checkpoint converted by sparseinfer-convert already; load "
                        "it as it is, or convert its Hugging Face source folder.")
    hf, cfg, reader, _ = open_source(folder)
    load_tokenizer(folder)  # a broken tokenizer fails now, not after the conversion
    # Everything the source's block chose is kept; a bad field (an unknown predictor) fails now,
    # not at the first load.
    source_block = checkpoint.SparseInferBlock.from_json(hf.get(checkpoint.BLOCK_KEY),
                                                         f"{folder}/config.json")
    alpha_given = alpha is not None
    if alpha is None:  # keep alphas calibrated in the source folder (as `load` does)
        alpha = source_block.alpha
    else:  # the source's marker described its alphas, not these
        source_block = source_block.replace(calibration=None)
    alphas = _alpha(alpha, cfg.num_hidden_layers)
    source = os.path.abspath(folder) if os.path.isdir(os.fspath(src)) else os.fspath(src)
    specs = _specs(cfg, np_dtype, quantize)
    copies = [f for f in TOKENIZER_FILES if os.path.isfile(os.path.join(folder, f))]
    size = (params.size_on_disk(specs)
            + sum(os.path.getsize(os.path.join(folder, f)) for f in copies))
    with checkpoint.atomic_directory(out, overwrite=overwrite, size=size) as tmp:
        arrays = (leaves(reader, cfg, np_dtype) if quantize is None
                  else _quantized(leaves(reader, cfg, np.dtype(np.float32)), np_dtype))
        _write_params(os.path.join(tmp, checkpoint.PARAMS_DIR), len(specs), arrays, progress)
        checkpoint.write_checkpoint_config(tmp, hf, checkpoint.new_block(
            alphas, dtype, source, base=source_block, quantize=quantize))
        for file in copies:
            shutil.copy2(os.path.join(folder, file), os.path.join(tmp, file))
        # In the temporary folder: an interrupted calibration keeps the old checkpoint.
        note = calibrate_checkpoint(tmp, alpha_given=alpha_given, calibrate=calibrate,
                                    progress=progress, shown_as=out)
    if note:
        (say or (lambda line: print(line, file=sys.stderr)))(note)
    return out
