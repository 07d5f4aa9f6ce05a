"""The two-stage `sparse_mlp`: equal to the one-stage chain and to numpy, fired counted right."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from kernel_cases import (
    CASES,
    FATRELU_THRESHOLD,
    act_numpy,
    assert_close,
    counts_for,
    index_list,
    weights,
)

from pallas_kernels import backend as bk
from pallas_kernels import sparse_down, sparse_gate_up, sparse_mlp
from pallas_kernels.sparse_mlp import sparse_mlp_xla

BACKENDS = ("pallas", "xla", "reference")


def mlp_numpy(x, gate, up, down_t, idx, count, activation):
    """(out, fired) in float64: the candidates' act(g) * u times their down rows."""
    rows = idx[:count]
    a = act_numpy(x @ gate[rows].T, activation)
    fired = int(np.any(a != 0, axis=0).sum())
    return (a * (x @ up[rows].T)) @ down_t[rows], fired


def run(backend, x, gate, up, down_t, idx, count, dtype, activation):
    cast = lambda a: jnp.asarray(a, dtype)  # noqa: E731
    return sparse_mlp(cast(x), cast(gate), cast(up), cast(down_t), jnp.asarray(idx),
                      jnp.int32(count), activation=activation, threshold=FATRELU_THRESHOLD,
                      backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("b,d,f,dtype,activation", CASES)
def test_sparse_mlp_matches_numpy_and_one_stage(backend, b, d, f, dtype, activation):
    x, gate, up, down_t = weights(b, d, f, dtype)
    counts = counts_for(f) if backend != "pallas" else [0, 1, f // 3, f]
    for count in counts:
        idx = index_list(f, count, seed=count)
        want, want_fired = mlp_numpy(x, gate, up, down_t, idx, count, activation)
        out, fired = run(backend, x, gate, up, down_t, idx, count, dtype, activation)
        assert out.dtype == dtype and out.shape == (b, d)
        assert_close(out, want, dtype)
        assert fired.shape == (f,) and not bool(fired[count:].any())
        assert int(fired.sum()) == want_fired, (count, int(fired.sum()), want_fired)
        # Today's one-stage chain gives the same output (same neurons contribute).
        cast = lambda a: jnp.asarray(a, dtype)  # noqa: E731
        h = sparse_gate_up(cast(x), cast(gate), cast(up), jnp.asarray(idx), jnp.int32(count),
                           activation=activation, threshold=FATRELU_THRESHOLD, backend=backend)
        old = sparse_down(h, cast(down_t), jnp.asarray(idx), jnp.int32(count), backend=backend)
        assert_close(out, np.asarray(jnp.asarray(old, jnp.float32), np.float64), dtype)


@pytest.mark.parametrize("dense_above", [0.0, 0.5, 1.0])
def test_xla_stages_agree_dense_and_chunked(dense_above):
    """Both stages' dense and chunked branches (forced by the switch point) give one answer."""
    b, d, f = 3, 70, 200
    x, gate, up, down_t = weights(b, d, f, jnp.float32, seed=3)
    for count in (0, 1, bk.CHUNK + 1, f // 2 + 1, f):
        idx = index_list(f, count, seed=count)
        want, want_fired = mlp_numpy(x, gate, up, down_t, idx, count, "relu")
        out, fired = sparse_mlp_xla(
            *(jnp.asarray(a, jnp.float32) for a in (x, gate, up, down_t)), jnp.asarray(idx),
            jnp.int32(count), activation="relu", threshold=0.0, dense_above=dense_above)
        assert_close(out, want, jnp.float32)
        assert int(fired.sum()) == want_fired


def test_unfired_candidates_do_not_count():
    """Candidates whose gate is negative for every row are not fired and change nothing."""
    b, d, f = 2, 64, 130
    x, gate, up, down_t = weights(b, d, f, jnp.float32, seed=5)
    x = np.abs(x)
    gate[::2] = -np.abs(gate[::2])  # every even neuron's gate is <= 0 for a positive x
    idx = np.arange(f, dtype=np.int32)
    for backend in BACKENDS:
        out, fired = run(backend, x, gate, up, down_t, idx, f, jnp.float32, "relu")
        want, want_fired = mlp_numpy(x, gate, up, down_t, idx, f, "relu")
        assert want_fired <= f - len(range(0, f, 2))
        assert int(fired.sum()) == want_fired
        assert_close(out, want, jnp.float32)


BAD = [  # (description, kwargs change, error)
    ("silu is not ReLU-family", dict(activation="silu"), ValueError),
    ("unknown backend", dict(backend="cuda"), ValueError),
    ("idx of the wrong length", dict(idx=np.zeros(7, np.int32)), AssertionError),
    ("idx not int32", dict(idx=np.zeros(45, np.float32)), AssertionError),
]


@pytest.mark.parametrize("what,change,error", BAD, ids=[c[0] for c in BAD])
def test_bad_inputs(what, change, error):
    x, gate, up, down_t = weights(1, 70, 45, jnp.float32)
    kwargs = dict(idx=np.zeros(45, np.int32), activation="relu", backend="xla")
    kwargs.update(change)
    idx = jnp.asarray(kwargs.pop("idx"))
    with pytest.raises(error):
        sparse_mlp(jnp.asarray(x), jnp.asarray(gate), jnp.asarray(up), jnp.asarray(down_t), idx,
                   jnp.int32(1), **kwargs)
