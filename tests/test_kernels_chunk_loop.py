"""The CPU's chunk loop (`xla/chunk_loop.py`): both stages against numpy and the two-stage
reference, at the chunk edges and the dense switch point, fired counted right."""

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

from pallas_kernels.xla import chunk_loop
from pallas_kernels.xla.chunk_loop import CHUNK, sparse_mlp_xla, two_stage_reference


def mlp_numpy(x, gate, up, down_t, idx, count, activation):
    """(out, fired) in float64: the candidates' act(g) * u times their down rows."""
    rows = idx[:count]
    a = act_numpy(x @ gate[rows].T, activation)
    fired = int(np.any(a != 0, axis=0).sum())
    return (a * (x @ up[rows].T)) @ down_t[rows], fired


@pytest.mark.parametrize("b,d,f,dtype,activation", CASES)
def test_chunk_loop_and_reference_match_numpy(b, d, f, dtype, activation):
    x, gate, up, down_t = weights(b, d, f, dtype)
    cast = lambda a: jnp.asarray(a, dtype)  # noqa: E731
    args = [cast(a) for a in (x, gate, up, down_t)]
    kw = dict(activation=activation, threshold=FATRELU_THRESHOLD)
    for count in counts_for(f):
        idx = index_list(f, count, seed=count)
        want, want_fired = mlp_numpy(x, gate, up, down_t, idx, count, activation)
        out, fired = sparse_mlp_xla(*args, jnp.asarray(idx), jnp.int32(count), **kw)
        assert out.dtype == jnp.float32 and out.shape == (b, d)
        assert_close(out, want, dtype)
        assert int(fired) == want_fired, (count, int(fired), want_fired)
        ref, ref_fired = two_stage_reference(*args, jnp.asarray(idx), jnp.int32(count), **kw)
        assert_close(ref, want, dtype)
        assert int(ref_fired.sum()) == want_fired and not bool(ref_fired[count:].any())


def test_path_choice():
    assert [bool(chunk_loop.use_dense(jnp.int32(c), 200)) for c in (0, 100, 101, 200)] == [
        False, False, True, True]
    assert [int(chunk_loop.num_chunks(jnp.int32(c), 64)) for c in (0, 1, 64, 65)] == [0, 1, 1, 2]


@pytest.mark.parametrize("dense_above", [0.0, 0.5, 1.0])
def test_stages_agree_dense_and_chunked(dense_above):
    """Both stages' dense and chunked branches (forced by the switch point) give one answer."""
    b, d, f = 3, 70, 200
    x, gate, up, down_t = weights(b, d, f, jnp.float32, seed=3)
    for count in (0, 1, CHUNK + 1, f // 2 + 1, f):
        idx = index_list(f, count, seed=count)
        want, want_fired = mlp_numpy(x, gate, up, down_t, idx, count, "relu")
        out, fired = sparse_mlp_xla(
            *(jnp.asarray(a, jnp.float32) for a in (x, gate, up, down_t)), jnp.asarray(idx),
            jnp.int32(count), activation="relu", threshold=0.0, dense_above=dense_above)
        assert_close(out, want, jnp.float32)
        assert int(fired) == want_fired


def test_unfired_candidates_do_not_count():
    """Candidates whose gate is negative for every row are not fired and change nothing."""
    b, d, f = 2, 64, 130
    x, gate, up, down_t = weights(b, d, f, jnp.float32, seed=5)
    x = np.abs(x)
    gate[::2] = -np.abs(gate[::2])  # every even neuron's gate is <= 0 for a positive x
    idx = np.arange(f, dtype=np.int32)
    out, fired = sparse_mlp_xla(*(jnp.asarray(a, jnp.float32) for a in (x, gate, up, down_t)),
                                jnp.asarray(idx), jnp.int32(f), activation="relu", threshold=0.0)
    want, want_fired = mlp_numpy(x, gate, up, down_t, idx, f, "relu")
    assert want_fired <= f - len(range(0, f, 2))
    assert int(fired) == want_fired
    assert_close(out, want, jnp.float32)
