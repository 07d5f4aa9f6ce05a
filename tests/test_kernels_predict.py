"""The sign-bit predictor: `threshold`, `sign_predict` on every backend, `compact`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import backend as bk
from pallas_kernels import compact, sign_predict, threshold
from pallas_kernels.gpu.predict import sign_predict_pallas
from pallas_kernels.gpu.triton_check import triton_modules
from pallas_kernels.pack import pack_sign_bits_numpy

BACKENDS = ("pallas", "xla", "reference")


def ratio_rule(n_neg, n_nz, alpha) -> np.ndarray:
    """The paper's rule, predicted zero iff N_neg > alpha * N_pos, evaluated in float32."""
    # inf * 0 is NaN (NaN comparisons are False: kept); huge alphas overflow to inf.
    with np.errstate(invalid="ignore", over="ignore"):
        pos = np.float32(alpha) * (n_nz - n_neg).astype(np.float32)
        return n_neg.astype(np.float32) > pos


def predict_numpy(x: np.ndarray, w: np.ndarray, alpha: float):
    """The rule straight from the float weights: (active union `[F]`, n_neg `[B, F]`)."""
    x, w = x.astype(np.float32), w.astype(np.float32)
    votes = (x != 0)[:, None, :] & ((x < 0)[:, None, :] != (w < 0)[None, :, :])
    n_neg = votes.sum(-1).astype(np.int32)
    n_nz = (x != 0).sum(-1).astype(np.int32)[:, None]
    return ~ratio_rule(n_neg, n_nz, alpha).all(0), n_neg


def inputs(b: int, d: int, f: int, dtype, seed: int = 0):
    """x with +0.0/-0.0 entries, W_gate with exact zeros (they count as positive), packed bits."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((b, d)).astype(np.float32)
    x[:, ::5] = 0.0
    x[:, 2::9] = -0.0
    w = rng.standard_normal((f, d)).astype(np.float32)
    w[::3, ::4] = 0.0
    x = np.asarray(jnp.asarray(x, dtype).astype(jnp.float32))
    w = np.asarray(jnp.asarray(w, dtype).astype(jnp.float32))
    return x, w, jnp.asarray(pack_sign_bits_numpy(w))


# --- threshold ---------------------------------------------------------------------------------

def sweep_alphas() -> np.ndarray:
    """Simple ratios and their float32 neighbours (where rounding bites), extremes, random."""
    ratios = np.array([k / m for k in range(0, 9) for m in range(1, 9)], np.float32)
    near = np.concatenate([np.nextafter(ratios, np.float32(np.inf)),
                           np.nextafter(ratios, np.float32(0))])
    extremes = np.array([1e-30, 1e-7, 1e6, 1e30, 3e38, np.inf], np.float32)
    rand = np.random.default_rng(0).exponential(1.0, 64).astype(np.float32)
    return np.unique(np.concatenate([ratios, near, extremes, rand]))


def test_threshold_equals_ratio_rule_on_sweep():
    alphas = sweep_alphas()
    ns = np.concatenate([np.arange(0, 130), [4095, 4096, 8191, 11008]]).astype(np.int32)
    tau = np.asarray(threshold(jnp.asarray(alphas)[:, None], jnp.asarray(ns)[None, :]))
    assert tau.dtype == np.int32 and tau.shape == (len(alphas), len(ns))
    with np.errstate(invalid="ignore", over="ignore"):
        a = alphas[:, None].astype(np.float64)
        naive = np.where(np.isinf(a), ns, np.floor(a * ns / (1 + a)))
    naive_wrong = 0
    for j, n in enumerate(ns):
        t = np.arange(n + 1, dtype=np.int32)  # every possible N_neg
        zero = ratio_rule(t[None, :], n, alphas[:, None])
        np.testing.assert_array_equal(t[None, :] > tau[:, j : j + 1], zero, err_msg=f"n={n}")
        naive_wrong += int(((t[None, :] > naive[:, j : j + 1]) != zero).any(axis=1).sum())
    assert naive_wrong > 0, "the sweep should include cases where a plain floor() rounds wrong"


def test_threshold_special_values():
    n = jnp.arange(0, 50, dtype=jnp.int32)
    np.testing.assert_array_equal(threshold(jnp.float32(np.inf), n), n)  # keep everything
    np.testing.assert_array_equal(threshold(jnp.float32(0), n), 0)  # any negative vote skips
    np.testing.assert_array_equal(threshold(jnp.float32(1), n), n // 2)  # majority vote
    taus = np.asarray(threshold(jnp.asarray(sweep_alphas())[:, None], n[None, :]))
    assert (np.diff(taus, axis=0) >= 0).all(), "larger alpha must never skip more neurons"


def test_threshold_broadcasts():
    alpha = jnp.asarray([0.5, 1.0, 2.0], jnp.float32)  # per layer
    assert threshold(alpha, jnp.int32(10)).shape == (3,)
    assert threshold(alpha[:, None], jnp.arange(4, dtype=jnp.int32)).shape == (3, 4)
    assert threshold(jnp.float32(1.0), jnp.ones((4, 1), jnp.int32)).shape == (4, 1)


# --- sign_predict ------------------------------------------------------------------------------

CASES = [  # (B, D, F, dtype)
    (1, 70, 45, jnp.float32),
    (4, 70, 45, jnp.bfloat16),
    (4, 96, 200, jnp.float32),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("b,d,f,dtype", CASES)
def test_sign_predict_matches_rule(backend, b, d, f, dtype):
    # Pallas interpret mode leaves unwritten int32 outputs at INT_MIN: the exact n_neg compare
    # catches any block a program skipped.
    x, w, w_bits = inputs(b, d, f, dtype, seed=d + f)
    run = jax.jit(lambda x, a: sign_predict(x, w_bits, a, backend=backend))
    for alpha in (0.0, 0.7, 1.0, 1.6, np.inf):
        active, n_neg = run(jnp.asarray(x, dtype), jnp.float32(alpha))
        want_active, want_n_neg = predict_numpy(x, w, alpha)
        assert active.dtype == jnp.bool_ and active.shape == (f,)
        np.testing.assert_array_equal(np.asarray(n_neg), want_n_neg)
        np.testing.assert_array_equal(np.asarray(active), want_active, err_msg=f"alpha={alpha}")


@pytest.mark.parametrize("block_f,block_w", [(16, 1), (32, 2), (256, 32)])
def test_sign_predict_block_sizes(block_f, block_w):
    x, w, w_bits = inputs(3, 200, 70, jnp.float32, seed=block_f)
    active, n_neg = sign_predict_pallas(jnp.asarray(x), w_bits, jnp.float32(1.0),
                                        block_f=block_f, block_w=block_w, interpret=True)
    want_active, want_n_neg = predict_numpy(x, w, 1.0)
    np.testing.assert_array_equal(np.asarray(n_neg), want_n_neg)
    np.testing.assert_array_equal(np.asarray(active), want_active.astype(np.int32))


@pytest.mark.parametrize("backend", BACKENDS)
def test_zeros_and_padding_never_vote(backend):
    d, f = 70, 45
    _, w, w_bits = inputs(1, d, f, jnp.float32)
    # Set every padding bit of the weight words: still no vote, since x's non-zero bits are 0 there.
    w_bits = w_bits.at[:, -1].set(w_bits[:, -1] | ~jnp.uint32((1 << (d % 32)) - 1))
    x = np.random.default_rng(1).standard_normal((3, d)).astype(np.float32)
    x[1] = 0.0
    x[2] = -0.0
    active, n_neg = sign_predict(jnp.asarray(x), w_bits, jnp.float32(0.0), backend=backend)
    np.testing.assert_array_equal(np.asarray(n_neg), predict_numpy(x, w, 0.0)[1])
    np.testing.assert_array_equal(np.asarray(n_neg)[1:], 0)
    assert np.asarray(active).all()  # all-zero rows have n_nz = 0: nothing to skip on


@pytest.mark.parametrize("backend", BACKENDS)
def test_alpha_inf_keeps_all(backend):
    x, _, w_bits = inputs(2, 96, 200, jnp.float32)
    active, _ = sign_predict(jnp.asarray(x), w_bits, jnp.float32(np.inf), backend=backend)
    assert np.asarray(active).all()


@pytest.mark.parametrize("backend", ["pallas", "xla"])
def test_changing_alpha_does_not_retrace(backend):
    x, _, w_bits = inputs(2, 70, 45, jnp.float32)
    traces = []

    @jax.jit
    def run(x, alpha):
        traces.append(None)
        return sign_predict(x, w_bits, alpha, backend=backend)

    counts = [int(run(jnp.asarray(x), jnp.float32(a))[0].sum()) for a in (0.0, 1.0, np.inf)]
    assert len(traces) == 1
    assert counts[0] <= counts[1] <= counts[2] == 45


def test_sign_predict_lowers_to_triton():
    for b in (1, 4):
        (module,) = triton_modules(sign_predict_pallas, jnp.ones((b, 70), jnp.bfloat16),
                                   jnp.ones((45, 3), jnp.uint32), jnp.float32(1.0))
        assert "__nv_popc" in module


# --- compact -----------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["none", "one", "random", "all"])
def test_compact(kind):
    f = 45
    mask = {"none": np.zeros(f, bool), "one": np.eye(f, dtype=bool)[17],
            "random": np.random.default_rng(0).random(f) < 0.3, "all": np.ones(f, bool)}[kind]
    idx, count = jax.jit(compact)(jnp.asarray(mask))
    want = np.flatnonzero(mask)
    assert idx.dtype == jnp.int32 and idx.shape == (f,) and int(count) == len(want)
    np.testing.assert_array_equal(np.asarray(idx)[: len(want)], want)
    np.testing.assert_array_equal(np.asarray(idx)[len(want):], 0)


# --- GPU ---------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not bk.on_gpu(), reason="needs a GPU")
@pytest.mark.parametrize("b,d,f,dtype", [(1, 4096, 11008, jnp.bfloat16), *CASES])
def test_sign_predict_compiled_on_gpu(b, d, f, dtype):
    x, w, w_bits = inputs(b, d, f, dtype)
    for alpha in (0.5, 1.0):
        active, n_neg = sign_predict(jnp.asarray(x, dtype), w_bits, jnp.float32(alpha),
                                     backend="pallas")
        want_active, want_n_neg = predict_numpy(x, w, alpha)
        np.testing.assert_array_equal(np.asarray(n_neg), want_n_neg)
        np.testing.assert_array_equal(np.asarray(active), want_active)
