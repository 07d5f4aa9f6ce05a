"""The converter's calibration step on a written checkpoint: load, calibrate, write config.json."""

from __future__ import annotations

import os
import sys

from sparseinfer_jax.model.config import PREDICTORS, config_from_hf_dict
from sparseinfer_jax.tuning.calibration import DEFAULT_RECALL, calibrate_default


def calibrate_checkpoint(
    path: str | os.PathLike, *, alpha_given: bool, calibrate: bool, progress: bool = False,
    shown_as: str | None = None,
) -> str | None:
    """`sparseinfer-convert`'s last step on the checkpoint it wrote at `path`.

    Alphas given on the command line are marked as chosen, and a calibration kept from the source
    (`convert` keeps the source's marker with its alphas and predictor) stays as it is; else,
    unless `calibrate` is False (`--no-calibrate`: no marker, so sparse mode calibrates in memory
    at load), `calibrate_default` runs and its alphas, predictor and marker are written into
    config.json; `progress` says so first on stderr (and how to skip it), then shows a progress bar
    with the time left. Returns one line saying what happened, or None; it names the checkpoint
    `shown_as` (default `path`: the converter calibrates in its temporary folder).
    """
    from sparseinfer_jax.api.loading import load
    from sparseinfer_jax.io import checkpoint

    hf, block = checkpoint.read_checkpoint_config(path)
    if alpha_given:
        checkpoint.write_checkpoint_config(
            path, hf, block.replace(calibration="alpha given to sparseinfer-convert"))
        return None
    if block.is_calibrated or not calibrate:
        return None
    if not config_from_hf_dict(hf).is_relu_family:
        return (f"hidden_act is '{hf.get('hidden_act')}': this model runs dense only, so it was "
                "not calibrated")
    if progress:
        print("calibrating alpha per layer on the built-in text (recall >= "
              f"{DEFAULT_RECALL}, predictors {' and '.join(PREDICTORS)}); pass --no-calibrate to "
              "skip this step", file=sys.stderr, flush=True)
    model, tokenizer = load(path, mode="dense", mesh=None)
    if tokenizer is None:
        return (
            f"{shown_as or path} has no tokenizer, so it was not calibrated: copy the source's "
            "tokenizer.json into it, then run `sparseinfer calibrate` (text commands need it too)"
        )
    cal, note, seconds = calibrate_default(model, tokenizer, progress=progress)
    checkpoint.write_calibration(path, cal.config_alphas(), cal.predictor,
                                 f"sparseinfer-convert default: {note}")
    sparsity = " ".join(f"{s:.2f}" for s in cal.predicted_sparsity)
    alphas = ",".join(f"{a:g}" for a in cal.config_alphas())
    return (
        f"calibrated for {note} in {seconds:.1f} s: alpha {alphas}, predicted sparsity per layer "
        f"{sparsity} (override with `sparseinfer calibrate`)"
    )
