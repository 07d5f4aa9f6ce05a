"""The portable sparse MLP layer against a float64 numpy reference: predictors, bucket edges, rows
it must never use, the union over a named axis, and float16 weights."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from kernel_cases import FATRELU_THRESHOLD, act_numpy, as_dtype, assert_close

from pallas_kernels import pack_sign_bits_numpy, threshold
from pallas_kernels.signmag import quantise
from pallas_kernels.xla.portable import DENSE_ABOVE, bucket, capacities, sparse_mlp_layer_portable

# A value no used row holds: a row the op should not use that leaks into a sum shows at once.
POISON = {jnp.float32: 1e30, jnp.bfloat16: 1e30, jnp.float16: 6e4}


def predicted_numpy(x, gate, alpha, predictor, activation):
    """Each row's predicted-active mask `[B, F]`, from the rules written out in numpy."""
    if predictor == "oracle":
        return act_numpy(x @ gate.T, activation) != 0
    differ = (x[:, None, :] < 0) != (gate[None] < 0)  # [B, F, D]: the product's sign is negative
    if predictor == "sign":
        weight = (x != 0).astype(np.int64)
    else:
        weight = np.asarray(quantise(jnp.asarray(x, jnp.float32)), np.int64)
    n_neg = np.einsum("bfd,bd->bf", differ.astype(np.int64), weight)
    tau = np.asarray(threshold(jnp.float32(alpha), jnp.asarray(weight.sum(-1), jnp.int32)))
    return n_neg <= tau[:, None]


def layer_numpy(x, gate, up, down_t, rows_active, activation):
    """(out, [predicted, computed, fired]) in float64, from the candidates' rows only."""
    cand = np.flatnonzero(rows_active.any(axis=0))
    a = act_numpy(x @ gate[cand].T, activation)
    fired = int(np.any(a != 0, axis=0).sum())
    out = (a * (x @ up[cand].T)) @ down_t[cand]
    return out, [int(rows_active.sum()), len(cand), fired]


def run(x, gate, up, down_t, alpha, dtype, *, bits=None, **kw):
    cast = lambda a: jnp.asarray(a, dtype)  # noqa: E731
    bits = pack_sign_bits_numpy(gate) if bits is None else bits
    return sparse_mlp_layer_portable(cast(x), cast(gate), cast(up), cast(down_t),
                                     jnp.asarray(bits), jnp.float32(alpha), **kw)


def weights(b, d, f, dtype, seed):
    rng = np.random.default_rng(seed)
    return [as_dtype(rng.standard_normal(s), dtype) for s in [(b, d), (f, d), (f, d), (f, d)]]


CASES = [  # (B, D, F, dtype, predictor, activation, alpha): odd D and F, batch 1 to 16
    (1, 70, 45, jnp.float32, "sign", "relu", 1.0),
    (3, 70, 45, jnp.bfloat16, "signmag", "fatrelu", 0.7),
    (16, 96, 200, jnp.float32, "sign", "fatrelu", 0.4),
    (5, 130, 301, jnp.float16, "sign", "relu", 0.6),
    (2, 96, 200, jnp.float16, "signmag", "relu", 1.0),
    (4, 33, 130, jnp.float32, "oracle", "relu", 1.0),
    (1, 96, 200, jnp.bfloat16, "sign", "relu", float("inf")),
]


@pytest.mark.parametrize("b,d,f,dtype,predictor,activation,alpha", CASES)
def test_matches_numpy(b, d, f, dtype, predictor, activation, alpha):
    x, gate, up, down_t = weights(b, d, f, dtype, seed=b + d)
    rows_active = predicted_numpy(x, gate, alpha, predictor, activation)
    want, want_counts = layer_numpy(x, gate, up, down_t, rows_active, activation)
    out, counts = run(x, gate, up, down_t, alpha, dtype, predictor=predictor,
                      activation=activation, threshold=FATRELU_THRESHOLD)
    assert out.dtype == dtype and out.shape == (b, d)
    assert counts.dtype == jnp.int32 and counts.tolist() == want_counts
    assert_close(out, want, dtype)


def forced(d, f, computed, fired, seed):
    """x > 0 and gate rows whose sign bits make exactly `computed` neurons candidates (one
    negative weight among positive ones), `fired` of them with a positive gate (the others' one
    negative weight outweighs the rest); every other neuron votes and is inactive."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(f)
    cand, fire = order[:computed], order[:fired]
    x = rng.uniform(0.5, 1.0, (1, d))
    gate = -rng.uniform(0.1, 1.0, (f, d))
    gate[cand] = rng.uniform(0.1, 1.0, (computed, d))
    gate[cand, 0] = -1.0
    gate[np.setdiff1d(cand, fire), 0] = -2.0 * d
    up, down_t = rng.standard_normal((f, d)), rng.standard_normal((f, d))
    return x, gate, up, down_t, cand, fire


F_EDGES = 100
SMALLEST = 4  # buckets 4, 8, 16, 32, 50 and 100 (dense) for F = 100
EDGES = sorted({c + e for c in capacities(F_EDGES, smallest=SMALLEST) for e in (-1, 0, 1)}
               & set(range(F_EDGES + 1)) | {0, 1})


@pytest.mark.parametrize("computed", EDGES)
def test_counts_at_bucket_edges_and_unused_rows_poisoned(computed):
    """Every candidate count on each side of each bucket edge, with the fired count on each side
    of the edges below it: the output equals numpy's, and the rows the op must not use (every row
    but the candidates' gate rows and the fired ones' up and down rows) hold POISON. Rows past the
    largest gather bucket run densely, which reads every row: there only the fired rows are clean.
    """
    d, f = 40, F_EDGES
    caps = capacities(f, smallest=SMALLEST)
    dense = computed > caps[-2]
    for fired in sorted({computed, computed // 2, *(e for e in EDGES if e < computed)})[-4:]:
        x, gate, up, down_t, cand, fire = forced(d, f, computed, fired, seed=computed + fired)
        want = (np.maximum(x @ gate[fire].T, 0) * (x @ up[fire].T)) @ down_t[fire]
        bits = pack_sign_bits_numpy(gate)
        dtype = jnp.float32
        poison = POISON[dtype]
        if not dense:
            gate[np.setdiff1d(np.arange(f), cand)] = poison
        if fired <= caps[-2]:
            unfired = np.setdiff1d(np.arange(f), fire)
            up[unfired] = poison
            down_t[unfired] = poison
        out, counts = run(x, gate, up, down_t, 1.0, dtype, bits=bits, smallest=SMALLEST)
        assert counts.tolist() == [computed, computed, fired], (computed, fired)
        assert_close(out, want, dtype)


def test_capacities_hold_every_count():
    for f in (1, 7, 45, 200, 5632, 11008):
        caps = capacities(f)
        assert caps[-1] == f and list(caps) == sorted(set(caps)) and caps[0] >= 1
        assert len(caps) == 1 or caps[-2] == int(DENSE_ABOVE * f)
        for count in {0, 1, f // 3, f // 2, f // 2 + 1, f - 1, f} & set(range(f + 1)):
            k = int(bucket(jnp.int32(count), caps))
            assert caps[k] >= count and (k == 0 or caps[k - 1] < count)


def test_union_axis_makes_the_split_batch_agree():
    """Rows split over a named axis (vmap's, as shard_map's inside a mesh) get the whole batch's
    candidates and fired set: each row's output and the union counts equal the unsplit call's."""
    b, d, f, dtype = 6, 70, 200, jnp.float32
    x, gate, up, down_t = weights(b, d, f, dtype, seed=11)
    bits = jnp.asarray(pack_sign_bits_numpy(gate))
    cast = lambda a: jnp.asarray(a, dtype)  # noqa: E731
    whole, counts = sparse_mlp_layer_portable(cast(x), cast(gate), cast(up), cast(down_t), bits,
                                              jnp.float32(0.5))
    one = lambda xs: sparse_mlp_layer_portable(  # noqa: E731
        xs, cast(gate), cast(up), cast(down_t), bits, jnp.float32(0.5), union_axis="data")
    split, split_counts = jax.vmap(one, axis_name="data")(cast(x).reshape(3, 2, d))
    assert_close(split.reshape(b, d), np.asarray(whole, np.float64), dtype)
    # Every shard's counts are the whole batch's: predicted summed over the axis, the rest of the
    # one union.
    assert (np.asarray(split_counts) == np.asarray(counts)).all()
    # Alone, a shard predicts fewer candidates than the union.
    alone = [int(sparse_mlp_layer_portable(xs, cast(gate), cast(up), cast(down_t), bits,
                                           jnp.float32(0.5))[1][1])
             for xs in cast(x).reshape(3, 2, d)]
    assert max(alone) < int(counts[1])


BAD = [  # (description, kwargs change, error)
    ("silu is not ReLU-family", dict(activation="silu"), ValueError),
    ("unknown predictor", dict(predictor="magnitude"), ValueError),
    ("sign bits of the wrong width", dict(bits=np.zeros((45, 2), np.uint32)), AssertionError),
    ("sign bits not uint32", dict(bits=np.zeros((45, 3), np.int32)), AssertionError),
    ("x not [B, D]", dict(x=np.zeros((70,), np.float32)), ValueError),
]


@pytest.mark.parametrize("what,change,error", BAD, ids=[c[0] for c in BAD])
def test_bad_inputs(what, change, error):
    x, gate, up, down_t = weights(1, 70, 45, jnp.float32, seed=0)
    kw = dict(x=x, bits=pack_sign_bits_numpy(gate))
    kw.update(change)
    with pytest.raises(error):
        run(kw.pop("x"), gate, up, down_t, 1.0, jnp.float32, **kw)
