"""The converter's calibration step on a written checkpoint: load, calibrate, write config.json."""

from __future__ import annotations

import os

from sparseinfer_jax.tuning.calibration import calibrate_default


def calibrate_checkpoint(
    path: str | os.PathLike, source: str | os.PathLike, *, alpha_given: bool, calibrate: bool
) -> str | None:
    """`sparseinfer-convert`'s last step on the checkpoint at `path`, converted from `source`.

    Alphas given on the command line, or calibrated ones kept from the source's `sparseinfer`
    block, are marked as chosen; else, unless `calibrate` is False (`--no-calibrate`: no marker,
    so sparse mode calibrates in memory at load), `calibrate_default` runs and its alphas and
    marker are written into config.json. Returns one line saying what happened, or None.
    """
    from sparseinfer_jax.api.loading import load
    from sparseinfer_jax.io import checkpoint
    from sparseinfer_jax.io.source import read_hf_config, resolve_source

    folder = resolve_source(os.fspath(source))
    source_block = checkpoint.SparseInferBlock.from_json(
        read_hf_config(folder).get(checkpoint.BLOCK_KEY), f"{folder}/config.json")
    marker = None
    if alpha_given:
        marker = "alpha given to sparseinfer-convert"
    elif source_block.is_calibrated and source_block.alpha is not None:
        marker = source_block.calibration
    if marker is not None or not calibrate:
        if marker is not None:
            hf, block = checkpoint.read_checkpoint_config(path)
            checkpoint.write_checkpoint_config(path, hf, block.replace(calibration=marker))
        return None
    model, tokenizer = load(path, mode="dense", mesh=None)
    if tokenizer is None:
        return (
            f"{path} has no tokenizer, so it was not calibrated; sparse mode warns until you run "
            "`sparseinfer calibrate` with a text."
        )
    cal, note, seconds = calibrate_default(model, tokenizer)
    checkpoint.write_calibration(path, cal.config_alphas(), cal.predictor,
                                 f"sparseinfer-convert default: {note}")
    sparsity = " ".join(f"{s:.2f}" for s in cal.predicted_sparsity)
    alphas = ",".join(f"{a:g}" for a in cal.config_alphas())
    return (
        f"calibrated for {note} in {seconds:.1f} s: alpha {alphas}, predicted sparsity per layer "
        f"{sparsity} (override with `sparseinfer calibrate`)"
    )
