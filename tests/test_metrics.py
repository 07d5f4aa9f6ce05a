"""The one definition of the per-layer predictor metrics, as generate, evaluate and calibrate
report them."""

from __future__ import annotations

import numpy as np
import pytest

from sparseinfer_jax.model.metrics import bytes_fraction, layer_metrics
from sparseinfer_jax.model.mlp import STAT_FIELDS
from sparseinfer_jax.runtime.results import LayerStats
from sparseinfer_jax.tuning.evaluation import _mode_entry

F = 64


def _counts(rng, layers: int, *, no_true: bool = False):
    """Random consistent counts: rows, predicted, true, both per layer, summed over rows."""
    rows = rng.integers(1, 20, layers).astype(np.float64)
    true = np.zeros(layers) if no_true else np.floor(rng.random(layers) * rows * F)
    pred = np.floor(rng.random(layers) * rows * F)
    both = np.minimum(np.floor(rng.random(layers) * np.minimum(pred, true)), true)
    return rows, pred, true, both


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_layer_metrics_definitions(seed):
    rows, pred, true, both = _counts(np.random.default_rng(seed), 5)
    m = layer_metrics(rows, pred, true, both, neurons=F, share=0.01)
    np.testing.assert_allclose(m["predicted_sparsity"], 1 - pred / (rows * F))
    np.testing.assert_allclose(m["true_sparsity"], 1 - true / (rows * F))
    np.testing.assert_allclose(m["recall"], np.where(true > 0, both / np.maximum(true, 1), 1.0))
    np.testing.assert_allclose(m["precision"], np.where(pred > 0, both / np.maximum(pred, 1), 1.0))
    np.testing.assert_allclose(m["mlp_bytes_fraction"],
                               bytes_fraction(pred, both, rows * F, 0.01))


def _sums(rows, pred, true, both, computed, fired) -> np.ndarray:
    fields = dict(rows=rows, predicted_active=pred, true_active=true, both_active=both,
                  computed=computed, fired=fired)
    return np.stack([fields[k] for k in STAT_FIELDS], axis=1)


def test_no_true_activation_means_full_recall_everywhere():
    """A layer with no truly active neuron missed nothing: recall 1.0 in generate's LayerStats,
    in evaluate and in calibrate's definition alike; a layer predicting none has precision 1.0."""
    rows, pred, true, both = _counts(np.random.default_rng(3), 4, no_true=True)
    pred[0] = 0
    steps = 7
    sums = _sums(rows, pred, true, both, np.full(4, 3.0 * steps), np.zeros(4))
    stats = LayerStats.from_sums(sums, steps, F, diagnostic=True)
    np.testing.assert_array_equal(stats.recall, 1.0)
    assert stats.precision[0] == 1.0
    entry = _mode_entry("sparse", 1.0, 1, 1, 1, sums.astype(np.float64), F, 0.0)
    assert [layer["recall"] for layer in entry["layers"]] == [1.0] * 4
    assert entry["layers"][0]["precision"] == 1.0 and entry["recall"] == 1.0
    np.testing.assert_array_equal(layer_metrics(rows, pred, true, both, neurons=F)["recall"], 1.0)


@pytest.mark.parametrize("seed", [4, 5])
def test_generate_and_evaluate_agree_on_the_same_counts(seed):
    rows, pred, true, both = _counts(np.random.default_rng(seed), 3)
    sums = _sums(rows, pred, true, both, pred, both)
    stats = LayerStats.from_sums(sums, 1, F, diagnostic=True)
    entry = _mode_entry("sparse", 1.0, 1, 1, 1, sums, F, 0.0)
    for key in ("predicted_sparsity", "true_sparsity", "recall", "precision"):
        np.testing.assert_allclose(getattr(stats, key), [layer[key] for layer in entry["layers"]])


def test_layer_stats_without_diagnostic_leaves_true_counts_out():
    rows, pred, true, both = _counts(np.random.default_rng(6), 2)
    stats = LayerStats.from_sums(_sums(rows, pred, true, both, pred, both), 4, F, False)
    assert stats.recall is None and stats.precision is None and stats.true_sparsity is None
    np.testing.assert_allclose(stats.computed_fraction, pred / (4 * F))
