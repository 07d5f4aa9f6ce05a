"""The sign-magnitude predictor: every backend equals a numpy model of the rule, the knob works."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import pack_sign_bits_numpy, signmag_predict, threshold
from pallas_kernels.signmag import PLANES

BACKENDS = ("pallas", "xla", "reference")
CASES = [  # (B, D, F): D not a multiple of 32, F not of the block, batch 1 and non-powers of 2
    (1, 70, 45),
    (3, 96, 200),
    (5, 33, 130),
    (2, 256, 64),
]


def numpy_rule(x: np.ndarray, gate: np.ndarray, alpha: float, planes: int = PLANES):
    """(active [F], n_neg [B, F], total [B]) straight from the float weights' signs."""
    a = np.abs(x.astype(np.float32))
    top = a.max(axis=1, keepdims=True)
    scale = np.where(top > 0, np.float32(2**planes - 1) / np.where(top > 0, top, 1), 0)
    q = np.round(a * scale.astype(np.float32)).astype(np.int64)
    negative = (x[:, None, :] > 0) & (gate[None] < 0) | (x[:, None, :] < 0) & (gate[None] >= 0)
    n_neg = (q[:, None, :] * negative).sum(axis=2)
    total = q.sum(axis=1)
    # The ratio rule itself (float32, as the model's), not the integer threshold.
    zero = n_neg.astype(np.float32) > np.float32(alpha) * (total[:, None] - n_neg).astype(
        np.float32)
    return (~zero).any(axis=0), n_neg, total


def inputs(b, d, f, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((b, d)).astype(np.float32)
    x[0, :5] = 0.0  # zero inputs never vote
    x[0, 5] = -0.0
    gate = rng.standard_normal((f, d)).astype(np.float32)
    gate[:, 7] = 0.0  # W = 0 counts as positive
    return x, gate


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("b,d,f", CASES)
def test_backends_match_the_numpy_rule(backend, b, d, f):
    x, gate = inputs(b, d, f)
    bits = jnp.asarray(pack_sign_bits_numpy(gate))
    for alpha in (0.3, 1.0, 1.7):
        active, n_neg, total = signmag_predict(jnp.asarray(x), bits, jnp.float32(alpha),
                                               backend=backend)
        want_active, want_neg, want_total = numpy_rule(x, gate, alpha)
        np.testing.assert_array_equal(np.asarray(n_neg), want_neg)
        np.testing.assert_array_equal(np.asarray(total), want_total)
        np.testing.assert_array_equal(np.asarray(active), want_active)


@pytest.mark.parametrize("planes", [1, 2, 4])
def test_planes_weight_the_votes(planes):
    x, gate = inputs(2, 70, 45, seed=1)
    bits = jnp.asarray(pack_sign_bits_numpy(gate))
    for backend in ("xla", "reference"):
        _, n_neg, total = signmag_predict(jnp.asarray(x), bits, jnp.float32(1.0),
                                          backend=backend, planes=planes)
        _, want_neg, want_total = numpy_rule(x, gate, 1.0, planes)
        np.testing.assert_array_equal(np.asarray(n_neg), want_neg)
        assert int(np.asarray(total).max()) <= 70 * (2**planes - 1)
        np.testing.assert_array_equal(np.asarray(total), want_total)


def test_larger_alpha_is_more_conservative_and_inf_keeps_all():
    x, gate = inputs(1, 256, 512, seed=2)
    bits = jnp.asarray(pack_sign_bits_numpy(gate))
    kept = [int(signmag_predict(jnp.asarray(x), bits, jnp.float32(a), backend="xla")[0].sum())
            for a in (0.2, 0.5, 1.0, 2.0, 4.0, np.inf)]
    assert kept == sorted(kept) and kept[0] < kept[-1] == 512


def test_integer_threshold_is_the_ratio_rule():
    """Per row: n_neg <= threshold(alpha, total) is exactly NOT(n_neg > alpha (total - n_neg))."""
    x, gate = inputs(3, 96, 200, seed=3)
    bits = jnp.asarray(pack_sign_bits_numpy(gate))
    _, n_neg, total = signmag_predict(jnp.asarray(x), bits, jnp.float32(1.3), backend="xla")
    per_row = np.asarray(n_neg) <= np.asarray(threshold(jnp.float32(1.3), total))[:, None]
    zero = np.asarray(n_neg, np.float32) > np.float32(1.3) * (
        np.asarray(total)[:, None] - np.asarray(n_neg)).astype(np.float32)
    np.testing.assert_array_equal(per_row, ~zero)


def test_all_zero_row_predicts_everything_active():
    """No input votes: total 0, n_neg 0, so every neuron stays (as in the sign rule)."""
    _, gate = inputs(1, 70, 45)
    bits = jnp.asarray(pack_sign_bits_numpy(gate))
    for backend in BACKENDS:
        active, n_neg, total = signmag_predict(jnp.zeros((1, 70)), bits, jnp.float32(0.5),
                                               backend=backend)
        assert bool(active.all()) and int(total[0]) == 0 and int(n_neg.max()) == 0


BAD = [  # (description, x shape, bits shape, bits dtype, alpha shape)
    ("x not 2-D", (70,), (45, 3), jnp.uint32, ()),
    ("bits of the wrong width", (1, 70), (45, 2), jnp.uint32, ()),
    ("bits not uint32", (1, 70), (45, 3), jnp.int32, ()),
    ("alpha per layer, not one", (1, 70), (45, 3), jnp.uint32, (4,)),
]


@pytest.mark.parametrize("what,xs,bs,bdt,alpha", BAD, ids=[c[0] for c in BAD])
def test_bad_inputs(what, xs, bs, bdt, alpha):
    with pytest.raises(AssertionError):
        signmag_predict(jnp.ones(xs), jnp.zeros(bs, bdt), jnp.ones(alpha), backend="xla")


def test_unknown_backend():
    with pytest.raises(ValueError, match="backend"):
        signmag_predict(jnp.ones((1, 70)), jnp.zeros((45, 3), jnp.uint32), 1.0, backend="cuda")
