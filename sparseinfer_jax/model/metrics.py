"""Per-layer predictor metrics: the one definition of recall, precision, sparsity and MLP bytes.

From neuron counts summed over the tokens (rows) a layer saw:
- predicted_sparsity = 1 - predicted active / (rows * F): the share of neurons skipped;
- true_sparsity = 1 - truly active / (rows * F);
- recall = both / truly active: the share of the true activations the predictor kept;
- precision = both / predicted active;
  recall and precision are 1.0 when their denominator is 0 (nothing to find, nothing wrong);
- mlp_bytes_fraction: MLP bytes read over the dense MLP's (`bytes_fraction`): the predictor's
  sign bits, the gate rows of the computed candidates and the up and down rows of the fired ones.

`generate` (decode steps, a batch reading the union of its rows), `evaluate` and `calibrate`
(each token alone) all report through `layer_metrics`.
"""

from __future__ import annotations

import numpy as np

from sparseinfer_jax.model.config import LlamaConfig

SCALE_BYTES = 4  # an int8 row's float32 scale


def row_bytes(cfg: LlamaConfig, itemsize: int, quantized: bool = False) -> int:
    """Bytes of one neuron's row of gate, up or down_t: D weights of `itemsize` bytes, plus the
    row's float32 scale when the weights are int8 (`model/quant.py`)."""
    return cfg.hidden_size * itemsize + (SCALE_BYTES if quantized else 0)


def mlp_weights(model) -> tuple[int, bool]:
    """`(itemsize, quantized)` of a `Llama`'s MLP weights, for `row_bytes` and `predictor_share`."""
    return (model.layers[0].mlp.gate[...].dtype.itemsize,
            getattr(model, "quantize", None) is not None)


def predictor_share(cfg: LlamaConfig, itemsize: int, quantized: bool = False) -> float:
    """Bytes of the packed gate sign bits over the dense MLP's weights (gate, up, down, with
    their scales when int8) per layer: F * W * 4 / (3 * F * row_bytes)."""
    return 4 * cfg.sign_words / (3 * row_bytes(cfg, itemsize, quantized))


def bytes_fraction(computed, fired, neurons, share: float):
    """MLP bytes read over the dense MLP's: `share` (the predictor) plus the gate rows of
    `computed` candidates and the up and down rows of `fired` neurons, out of 3 x `neurons`."""
    return (computed + 2 * fired) / (3 * neurons) + share


def ratio(num, den) -> np.ndarray:
    """`num / den` elementwise (float64), 1.0 where `den` is 0: recall and precision."""
    num, den = np.asarray(num, np.float64), np.asarray(den, np.float64)
    return np.where(den > 0, num / np.maximum(den, 1), 1.0)


def fraction(num, den) -> np.ndarray:
    """`num / den` elementwise (float64), 0 where `den` is 0: a share of the neurons."""
    num, den = np.asarray(num, np.float64), np.asarray(den, np.float64)
    return num / np.maximum(den, 1)


def layer_metrics(rows, predicted, true, both, *, neurons: int, share: float = 0.0,
                  computed=None, fired=None, steps=None) -> dict[str, np.ndarray]:
    """The metrics above from summed counts (arrays of any matching shape, e.g. `[L]`, `[L, G]`).

    Args:
      rows: tokens counted; predicted, true, both: predicted-active, truly active, and both
        predicted and truly active neurons, summed over those tokens.
      neurons: F, the neurons per layer; share: the predictor's bytes fraction
        (`predictor_share`; 0 for a free predictor such as the oracle's).
      computed, fired, steps: for decoding, the gate rows and the up and down rows read, summed
        over `steps` steps (a batch reads the union of its rows). Without them each token reads
        its own rows: the predicted-active gates and the up and down rows of those that fire
        (`both`).

    Returns:
      predicted_sparsity, true_sparsity, recall, precision, computed_fraction (gate rows read per
      step over F), fired_fraction (up and down rows read per step over F), mlp_bytes_fraction.
    """
    total = np.asarray(rows, np.float64) * neurons
    if computed is None:
        computed_fraction, fired_fraction = fraction(predicted, total), fraction(both, total)
    else:
        per_step = np.asarray(steps, np.float64) * neurons
        computed_fraction, fired_fraction = fraction(computed, per_step), fraction(fired, per_step)
    return dict(
        predicted_sparsity=1.0 - fraction(predicted, total),
        true_sparsity=1.0 - fraction(true, total),
        recall=ratio(both, true),
        precision=ratio(both, predicted),
        computed_fraction=computed_fraction,
        fired_fraction=fired_fraction,
        mlp_bytes_fraction=bytes_fraction(computed_fraction, fired_fraction, 1, share),
    )
