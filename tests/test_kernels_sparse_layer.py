"""The per-layer sparse MLP op `sparse_mlp_layer`: every backend against numpy, exact counts.

The numpy truth is written from the rules (float32 ratio test, magnitudes quantised in float32,
the true mask from float64 products), not from the jnp references. Pallas runs in interpret mode,
which fills every output a kernel does not write with NaN (floats) or INT_MIN (ints): a store the
kernel skips fails the output or the counts here.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from kernel_cases import FATRELU_THRESHOLD, act_numpy, as_dtype, assert_close

from pallas_kernels import backend as bk
from pallas_kernels import pack_sign_bits_numpy, sparse_mlp_layer
from pallas_kernels.gpu.layer import layer_pallas
from pallas_kernels.gpu.masked_down import masked_down_pallas
from pallas_kernels.gpu.predict_gate_up import predict_gate_up_pallas, round_half_even
from pallas_kernels.gpu.triton_check import triton_modules

BACKENDS = ("pallas", "xla", "reference")
PREDICTORS = ("sign", "signmag", "oracle")
CASES = [  # (B, D, F, dtype, activation): D, F not multiples of 32 / 128, batch 1 to 16
    (1, 70, 45, jnp.float32, "relu"),
    (3, 96, 200, jnp.bfloat16, "fatrelu"),
    (16, 40, 37, jnp.float32, "fatrelu"),
]
# 0 keeps only neurons with no negative vote, 1 a majority, inf every neuron; 0.6 in between.
ALPHAS = (1.0, 0.0, 0.6, np.inf)


def layer_inputs(b, d, f, dtype, seed=0):
    """x, gate, up, down_t as float64 (rounded to dtype) and the packed sign bits of gate."""
    rng = np.random.default_rng(seed)
    x, gate, up, down_t = (as_dtype(rng.standard_normal(s), dtype)
                           for s in [(b, d), (f, d), (f, d), (f, d)])
    return x, gate, up, down_t, pack_sign_bits_numpy(gate)


def row_masks_numpy(x, gate, alpha, predictor, activation):
    """Each row's predicted-active neurons `[B, F]`, from the rules in float32 (numpy)."""
    if predictor == "oracle":
        return act_numpy(x @ gate.T, activation) != 0
    differ = (x[:, None, :] < 0) != (gate[None, :, :] < 0)  # [B, F, D]
    if predictor == "signmag":
        a = np.abs(x).astype(np.float32)
        top = a.max(axis=1, keepdims=True)
        scale = np.where(top > 0, np.float32(7) / np.where(top > 0, top, 1), 0).astype(np.float32)
        weight = np.round(a * scale).astype(np.int64)  # numpy rounds half to even, as jnp
    else:
        weight = (x != 0).astype(np.int64)
    n_neg = np.sum(differ * weight[:, None, :], axis=2)
    n_pos = weight.sum(axis=1, keepdims=True) - n_neg
    return ~(n_neg.astype(np.float32) > np.float32(alpha) * n_pos.astype(np.float32))


def layer_numpy(x, gate, up, down_t, alpha, predictor, activation):
    """(out float64, counts [predicted, computed, fired])."""
    per_row = row_masks_numpy(x, gate, alpha, predictor, activation)
    active = per_row.any(axis=0)
    a = np.where(active, act_numpy(x @ gate.T, activation), 0.0)
    fired = (a != 0).any(axis=0)
    out = (a * (x @ up.T)) @ down_t
    return out, [int(per_row.sum()), int(active.sum()), int(fired.sum())]


def run(backend, x, gate, up, down_t, bits, alpha, dtype, predictor, activation, **kwargs):
    cast = lambda a: jnp.asarray(a, dtype)  # noqa: E731
    return sparse_mlp_layer(cast(x), cast(gate), cast(up), cast(down_t), jnp.asarray(bits),
                            jnp.float32(alpha), predictor=predictor, activation=activation,
                            threshold=FATRELU_THRESHOLD, backend=backend, **kwargs)


@pytest.mark.parametrize("predictor", PREDICTORS)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("b,d,f,dtype,activation", CASES)
def test_layer_matches_numpy_with_exact_counts(backend, predictor, b, d, f, dtype, activation):
    x, gate, up, down_t, bits = layer_inputs(b, d, f, dtype, seed=b + f)
    seen = set()
    for alpha in ALPHAS:
        want, want_counts = layer_numpy(x, gate, up, down_t, alpha, predictor, activation)
        out, counts = run(backend, x, gate, up, down_t, bits, alpha, dtype, predictor, activation)
        assert out.dtype == dtype and out.shape == (b, d)
        assert counts.dtype == jnp.int32 and counts.shape == (3,)
        assert_close(out, want, dtype)
        assert np.asarray(counts).tolist() == want_counts, (alpha, want_counts)
        seen.add(want_counts[1])
    if predictor != "oracle":  # the alphas reach both ends: no neuron and every neuron
        assert {0, f} <= seen, seen


@pytest.mark.parametrize("accumulate", ["partials", "atomic"])
@pytest.mark.parametrize("predictor", ["sign", "signmag", "oracle"])
def test_pallas_block_shapes(accumulate, predictor):
    """Several slot groups per block, several row and column blocks, both ways of adding them."""
    b, d, f, dtype = 2, 100, 77, jnp.float32
    x, gate, up, down_t, bits = layer_inputs(b, d, f, dtype, seed=9)
    blocks = dict(up_block_f=8, up_slots=2, up_tile=256, down_block_r=16, down_block_d=32,
                  down_slots=4)
    for alpha in (1.0, np.inf):
        want, want_counts = layer_numpy(x, gate, up, down_t, alpha, predictor, "relu")
        out, counts = jax.jit(functools.partial(
            layer_pallas, predictor=predictor, activation="relu", threshold=0.0,
            accumulate=accumulate, interpret=True, **blocks))(
                *(jnp.asarray(a, dtype) for a in (x, gate, up, down_t)), jnp.asarray(bits),
                jnp.float32(alpha))
        assert_close(out, want, dtype)
        assert np.asarray(counts).tolist() == want_counts


def test_signmag_ties_round_half_to_even():
    """Inputs whose scaled magnitudes sit exactly on .5 (max|x| = 7, so the scale is 1)."""
    d, f = 64, 24
    rng = np.random.default_rng(4)
    x = (rng.integers(0, 7, (1, d)) + 0.5) * rng.choice([-1.0, 1.0], (1, d))
    x[0, 0] = 7.0
    _, gate, up, down_t, bits = layer_inputs(1, d, f, jnp.float32, seed=4)
    for alpha in (0.3, 1.0, 2.0):
        want, want_counts = layer_numpy(x, gate, up, down_t, alpha, "signmag", "relu")
        for backend in BACKENDS:
            out, counts = run(backend, x, gate, up, down_t, bits, alpha, jnp.float32, "signmag",
                              "relu")
            assert np.asarray(counts).tolist() == want_counts, (backend, alpha)
            assert_close(out, want, jnp.float32)


def test_round_half_even_matches_jnp_round():
    v = jnp.concatenate([jnp.arange(0, 16, 0.25, dtype=jnp.float32),
                         jnp.asarray(np.random.default_rng(0).uniform(0, 7, 1000), jnp.float32),
                         jnp.asarray([np.nextafter(np.float32(2.5), np.float32(0)),
                                      np.nextafter(np.float32(2.5), np.float32(3))])])
    np.testing.assert_array_equal(np.asarray(round_half_even(v)), np.asarray(jnp.round(v)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_union_axis_makes_results_independent_of_the_batch_split(backend):
    """Four rows as one batch, and as two halves under a named axis (vmap here, shard_map in
    the model): the same output and the same counts."""
    b, d, f, dtype = 4, 70, 45, jnp.float32
    x, gate, up, down_t, bits = layer_inputs(b, d, f, dtype, seed=2)
    weights = [jnp.asarray(a, dtype) for a in (gate, up, down_t)] + [jnp.asarray(bits)]
    for predictor in ("sign", "oracle"):
        whole, whole_counts = sparse_mlp_layer(jnp.asarray(x, dtype), *weights, jnp.float32(0.6),
                                               predictor=predictor, backend=backend)
        halves, counts = jax.vmap(
            functools.partial(sparse_mlp_layer, predictor=predictor, backend=backend,
                              union_axis="data"),
            in_axes=(0, None, None, None, None, None), axis_name="data")(
                jnp.asarray(x, dtype).reshape(2, 2, d), *weights, jnp.float32(0.6))
        assert_close(halves.reshape(b, d), np.asarray(whole, np.float64), dtype)
        assert (np.asarray(counts) == np.asarray(whole_counts)).all(), (counts, whole_counts)
        # Each half alone predicts fewer neurons than the union: the axis is what joins them.
        alone, alone_counts = sparse_mlp_layer(jnp.asarray(x[:2], dtype), *weights,
                                               jnp.float32(0.6), predictor=predictor,
                                               backend=backend)
        assert int(alone_counts[1]) < int(whole_counts[1])


BAD = [  # (what, change, error)
    ("silu is not ReLU-family", dict(activation="silu"), ValueError),
    ("unknown predictor", dict(predictor="topk"), ValueError),
    ("unknown backend", dict(backend="cuda"), ValueError),
    ("x without a batch axis", dict(x=np.zeros(70)), ValueError),
    ("an empty batch", dict(x=np.zeros((0, 70))), ValueError),
    ("x of another width", dict(x=np.zeros((1, 71))), AssertionError),
    ("sign bits of the wrong width", dict(bits=np.zeros((45, 2), np.uint32)), AssertionError),
    ("sign bits not uint32", dict(bits=np.zeros((45, 3), np.int32)), AssertionError),
    ("alpha not a scalar", dict(alpha=np.ones(2, np.float32)), AssertionError),
    ("up of another shape", dict(up=np.zeros((44, 70))), AssertionError),
]


@pytest.mark.parametrize("what,change,error", BAD, ids=[c[0] for c in BAD])
def test_bad_inputs(what, change, error):
    x, gate, up, down_t, bits = layer_inputs(1, 70, 45, jnp.float32)
    args = dict(x=x, gate=gate, up=up, down_t=down_t, bits=bits, alpha=np.float32(1.0))
    statics = dict(predictor="sign", activation="relu", backend="xla")
    for key, value in change.items():
        (statics if key in statics else args)[key] = value
    with pytest.raises(error):
        sparse_mlp_layer(*(jnp.asarray(args[k]) for k in ("x", "gate", "up", "down_t", "bits",
                                                           "alpha")), **statics)


def _voting(x, w, alpha, bits, *, vote, activation):
    return predict_gate_up_pallas(x, w, w, alpha=alpha, bits=bits, vote=vote,
                                  activation=activation, threshold=0.1, zero_out=vote == "signmag")


def _masked(x, w, mask):
    return predict_gate_up_pallas(x, w, w, mask=mask, vote="mask")


def test_kernels_lower_to_triton():
    d, f = 70, 45
    for b, dtype in [(1, jnp.float32), (4, jnp.bfloat16)]:
        x, w = jnp.ones((b, d), dtype), jnp.ones((f, d), dtype)
        bits = jnp.zeros((f, 3), jnp.uint32)
        for vote, activation in [("sign", "relu"), ("signmag", "fatrelu")]:
            fn = functools.partial(_voting, vote=vote, activation=activation)
            assert len(triton_modules(fn, x, w, jnp.float32(1.0), bits)) == 1
        assert len(triton_modules(_masked, x, w, jnp.ones((f,), bool))) == 1
        h = jnp.ones((b, f), jnp.float32)
        assert len(triton_modules(masked_down_pallas, h, w)) == 1
        atomic = functools.partial(masked_down_pallas, accumulate="atomic")
        assert len(triton_modules(atomic, h, w, jnp.zeros((b, d), jnp.float32))) == 1


@pytest.mark.gpu
@pytest.mark.skipif(not bk.on_gpu(), reason="needs a GPU")
@pytest.mark.parametrize("b,d,f,dtype,activation",
                         [*CASES, (1, 4096, 11008, jnp.bfloat16, "relu"),
                          (16, 4096, 11008, jnp.bfloat16, "fatrelu")])
def test_layer_compiled_on_gpu(b, d, f, dtype, activation):
    """The Triton kernels compiled for the GPU equal the jnp reference, counts exactly."""
    x, gate, up, down_t, bits = layer_inputs(b, d, f, dtype, seed=f)
    for predictor in PREDICTORS:
        for alpha in (1.0, 0.6, np.inf):
            got, want = (run(be, x, gate, up, down_t, bits, alpha, dtype, predictor, activation)
                         for be in ("pallas", "reference"))
            assert_close(got[0], np.asarray(want[0].astype(jnp.float32), np.float64), dtype)
            assert np.asarray(got[1]).tolist() == np.asarray(want[1]).tolist(), (predictor, alpha)
        for accumulate in ("partials", "atomic"):
            out, counts = layer_pallas(
                *(jnp.asarray(a, dtype) for a in (x, gate, up, down_t)), jnp.asarray(bits),
                jnp.float32(1.0), predictor="sign", activation=activation,
                threshold=FATRELU_THRESHOLD, accumulate=accumulate)
            ref = run("reference", x, gate, up, down_t, bits, 1.0, dtype, "sign", activation)
            assert_close(out, np.asarray(ref[0].astype(jnp.float32), np.float64), dtype)
