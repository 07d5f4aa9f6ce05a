"""Alphas that make a random-weight model keep a chosen fraction of its neurons."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import pallas_kernels as pk
from sparseinfer_jax.model.llama import Llama
from sparseinfer_jax.tuning.calibration import window_counts


def alpha_grid(d: int) -> np.ndarray:
    """Alphas `[d + 1]` float32 ascending: alpha_t keeps a neuron iff N_neg <= t (t = 0..d) when
    all `d` inputs are non-zero, so every achievable active fraction has its grid point."""
    t = np.arange(d + 1, dtype=np.float64)
    with np.errstate(divide="ignore"):
        return ((t + 0.5) / np.maximum(d - t - 0.5, 0.0)).astype(np.float32)


def fit_alphas(grid: np.ndarray, predicted_fraction: np.ndarray,
               target: float) -> tuple[np.ndarray, np.ndarray]:
    """Per layer, the grid alpha whose predicted active fraction is closest to `target`.

    Args:
      grid: `[G]` alphas ascending; predicted_fraction: `[L, G]` active fraction at each.
      target: wanted active fraction in (0, 1]; 1 gives alpha = inf (every neuron, exactly).

    Returns:
      alphas `[L]` float32 and the fractions they give on the fitting data `[L]`.
    """
    layers = predicted_fraction.shape[0]
    if target >= 1.0:
        return np.full((layers,), np.inf, np.float32), np.ones((layers,))
    idx = np.argmin(np.abs(predicted_fraction - target), axis=1)
    rows = np.arange(layers)
    return grid[idx], predicted_fraction[rows, idx]


def alpha_keeping(x: jnp.ndarray, bits: jnp.ndarray, fraction: float) -> jnp.ndarray:
    """The grid alpha whose sign vote keeps about `fraction` of the neurons for `x: [1, D]`
    (`bits`: the layer's packed gate sign bits): the one-layer, one-input form of `fit_alphas`."""
    d = x.shape[1]
    _, n_neg = pk.sign_predict(x, bits, jnp.float32(1.0), backend="xla")
    kept = (np.asarray(n_neg)[0][None, :] <= np.arange(d + 1)[:, None]).mean(axis=1)
    return jnp.float32(fit_alphas(alpha_grid(d), kept[None], fraction)[0][0])


def decode_inputs_fraction(model: Llama, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Predicted active fraction `[L, G]` over `alpha_grid(D)` on the MLP inputs of `ids: [1, T]`.

    `ids` should be a prompt and its greedy continuation, so the MLP inputs are decode-time ones.
    """
    grid = alpha_grid(model.config.hidden_size)
    counts = window_counts(model, jnp.asarray(ids), jnp.asarray(grid))
    predicted, _, _, rows = jax.device_get(counts)
    return grid, predicted / (rows[:, None] * model.config.intermediate_size)


