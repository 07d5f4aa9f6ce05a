"""Gathered sparse MLP ops: `sparse_gate_up`, `sparse_down`, the XLA capacities, the whole chain."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from kernel_cases import (
    BACKENDS,
    CASES,
    FATRELU_THRESHOLD,
    as_dtype,
    assert_close,
    counts_for,
    down_numpy,
    gate_up_numpy,
    index_list,
    weights,
)

from pallas_kernels import backend as bk
from pallas_kernels import compact, pack_sign_bits_numpy, sign_predict, sparse_down, sparse_gate_up
from pallas_kernels.sparse_down import sparse_down_pallas, sparse_down_xla
from pallas_kernels.sparse_gate_up import sparse_gate_up_pallas, sparse_gate_up_xla
from pallas_kernels.triton_check import triton_modules


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("b,d,f,dtype,activation", CASES)
def test_sparse_gate_up(backend, b, d, f, dtype, activation):
    # Pallas interpret mode fills unwritten float outputs with NaN, so a skipped store fails here.
    x, gate, up, _ = weights(b, d, f, dtype, seed=f)
    run = jax.jit(functools.partial(sparse_gate_up, activation=activation,
                                    threshold=FATRELU_THRESHOLD, backend=backend))
    args = [jnp.asarray(a, dtype) for a in (x, gate, up)]
    for count in counts_for(f):
        idx = index_list(f, count, seed=count)
        h = run(*args, jnp.asarray(idx), jnp.int32(count))
        assert h.dtype == jnp.float32 and h.shape == (b, f)
        want = gate_up_numpy(x, gate, up, idx, count, activation)
        assert_close(h, want, dtype)
        assert (np.asarray(h)[:, count:] == 0).all(), f"count={count}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("b,d,f,dtype,activation", CASES)
def test_sparse_down(backend, b, d, f, dtype, activation):
    del activation
    x, _, _, down_t = weights(b, d, f, dtype, seed=d)
    h = np.random.default_rng(1).standard_normal((b, f)).astype(np.float32)
    run = jax.jit(functools.partial(sparse_down, backend=backend))
    for count in counts_for(f):
        idx = index_list(f, count, seed=count)
        hc = h.copy()
        hc[:, count:] = 0.0  # the contract: sparse_gate_up leaves 0 past count
        out = run(jnp.asarray(hc), jnp.asarray(down_t, dtype), jnp.asarray(idx), jnp.int32(count))
        assert out.dtype == dtype and out.shape == (b, d)
        assert_close(out, down_numpy(hc.astype(np.float64), down_t, idx, count), dtype)


@pytest.mark.parametrize("block_n,block_d", [(1, 16), (4, 32), (64, 128)])
def test_gate_up_block_sizes(block_n, block_d):
    b, d, f = 3, 70, 45
    x, gate, up, _ = weights(b, d, f, jnp.float32, seed=block_n)
    for count in (0, 1, 13, f):
        idx = index_list(f, count, seed=count)
        h = sparse_gate_up_pallas(*map(jnp.asarray, (x, gate, up, idx)), jnp.int32(count),
                                  block_n=block_n, block_d=block_d, interpret=True)
        assert_close(h, gate_up_numpy(x, gate, up, idx, count, "relu"), jnp.float32)


@pytest.mark.parametrize("block_n,block_d,num_splits", [(1, 16, 1), (4, 32, 3), (64, 128, 8)])
def test_down_block_sizes(block_n, block_d, num_splits):
    b, d, f = 3, 70, 45
    _, _, _, down_t = weights(b, d, f, jnp.float32, seed=block_n)
    h = np.random.default_rng(2).standard_normal((b, f))
    for count in (0, 1, 13, f):
        idx = index_list(f, count, seed=count)
        hc = h.copy()
        hc[:, count:] = 0.0
        out = sparse_down_pallas(jnp.asarray(hc, jnp.float32), jnp.asarray(down_t, jnp.float32),
                                 jnp.asarray(idx), jnp.int32(count), block_n=block_n,
                                 block_d=block_d, num_splits=num_splits, interpret=True)
        assert_close(out, down_numpy(hc, down_t, idx, count), jnp.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fatrelu_is_strict(backend):
    # x = e_0, so each pre-activation is exactly gate[i, 0]: z == threshold must give 0.
    d, f = 40, 8
    x = jnp.zeros((1, d)).at[0, 0].set(1.0)
    z = jnp.asarray([0.5, np.nextafter(np.float32(0.5), np.float32(1)), -1.0, 2.0, 0.0, 0.25,
                     0.5, 1.0], jnp.float32)
    gate = jnp.zeros((f, d)).at[:, 0].set(z)
    up = jnp.ones((f, d))
    h = sparse_gate_up(x, gate, up, jnp.arange(f, dtype=jnp.int32), jnp.int32(f),
                       activation="fatrelu", threshold=0.5, backend=backend)
    np.testing.assert_array_equal(np.asarray(h)[0], np.where(z > 0.5, z, 0.0))


def test_xla_path_choice():
    assert [bool(bk.use_dense(jnp.int32(c), 200)) for c in (0, 100, 101, 200)] == [
        False, False, True, True]
    assert [int(bk.num_chunks(jnp.int32(c), 64)) for c in (0, 1, 64, 65)] == [0, 1, 1, 2]


@pytest.mark.parametrize("dense_above", [0.0, 1.0])
@pytest.mark.parametrize("count", [0, 5, 64, 130, 200])
def test_xla_chunked_and_dense_paths_agree(dense_above, count):
    """Forcing either path (dense for every count, or the chunk loop up to F) is exact."""
    b, d, f = 2, 40, 200
    x, gate, up, down_t = weights(b, d, f, np.float32, seed=3)
    idx = index_list(f, count, seed=count)
    h = sparse_gate_up_xla(jnp.asarray(x), jnp.asarray(gate), jnp.asarray(up), jnp.asarray(idx),
                           jnp.int32(count), activation="relu", threshold=0.0,
                           dense_above=dense_above)
    want = gate_up_numpy(x, gate, up, idx, count, "relu")
    assert_close(h, want, np.float32)
    out = sparse_down_xla(h, jnp.asarray(down_t), jnp.asarray(idx), jnp.int32(count),
                          dense_above=dense_above)
    assert_close(out, down_numpy(np.asarray(h, np.float64), down_t, idx, count), np.float32)


def test_unknown_activation_and_backend_raise():
    x, w = jnp.ones((1, 4)), jnp.ones((2, 4))
    idx, count = jnp.zeros(2, jnp.int32), jnp.int32(0)
    with pytest.raises(ValueError, match="ReLU-family"):
        sparse_gate_up(x, w, w, idx, count, activation="silu")
    with pytest.raises(ValueError, match="Unknown backend"):
        sparse_down(jnp.ones((1, 2)), w, idx, count, backend="cuda")


@pytest.mark.parametrize("backend", ["pallas", "xla"])
def test_chain_matches_masked_dense_mlp(backend):
    """predict -> compact -> gate_up -> down equals the dense MLP over the predicted neurons."""
    b, d, f = 2, 96, 200
    x, gate, up, down_t = weights(b, d, f, jnp.float32, seed=7)
    w_bits = jnp.asarray(pack_sign_bits_numpy(gate))

    @jax.jit
    def chain(x, alpha):
        active, _ = sign_predict(x, w_bits, alpha, backend=backend)
        idx, count = compact(active, backend=backend)
        h = sparse_gate_up(x, jnp.asarray(gate, jnp.float32), jnp.asarray(up, jnp.float32), idx,
                           count, backend=backend)
        return sparse_down(h, jnp.asarray(down_t, jnp.float32), idx, count, backend=backend), active

    for alpha in (1.0, np.inf):
        out, active = chain(jnp.asarray(x, jnp.float32), jnp.float32(alpha))
        want_active, _ = sign_predict(jnp.asarray(x, jnp.float32), w_bits, jnp.float32(alpha),
                                      backend="reference")
        np.testing.assert_array_equal(np.asarray(active), np.asarray(want_active))
        h = np.maximum(x @ gate.T, 0) * (x @ up.T) * np.asarray(want_active)
        assert_close(out, h @ down_t, jnp.float32)


def test_sparse_kernels_lower_to_triton():
    f, d = 45, 70
    idx, count = jnp.zeros(f, jnp.int32), jnp.int32(3)
    for b, dtype, activation in [(1, jnp.float32, "relu"), (4, jnp.bfloat16, "fatrelu")]:
        w = jnp.ones((f, d), dtype)
        gate_up = functools.partial(sparse_gate_up_pallas, activation=activation, threshold=0.1)
        assert len(triton_modules(gate_up, jnp.ones((b, d), dtype), w, w, idx, count)) == 1
        assert len(triton_modules(sparse_down_pallas, jnp.ones((b, f)), w, idx, count)) == 1


@pytest.mark.gpu
@pytest.mark.skipif(not bk.on_gpu(), reason="needs a GPU")
@pytest.mark.parametrize("b,d,f,dtype,activation",
                         [*CASES, (1, 4096, 11008, jnp.bfloat16, "relu"),
                          (16, 4096, 11008, jnp.bfloat16, "fatrelu")])
def test_sparse_compiled_on_gpu(b, d, f, dtype, activation):
    x, gate, up, down_t = weights(b, d, f, dtype)
    args = [jnp.asarray(a, dtype) for a in (x, gate, up)]
    for count in (0, 1, f // 7, f):
        idx, n = jnp.asarray(index_list(f, count, seed=count)), jnp.int32(count)
        h, h_ref = (sparse_gate_up(*args, idx, n, activation=activation,
                                   threshold=FATRELU_THRESHOLD, backend=be)
                    for be in ("pallas", "reference"))
        assert_close(h, np.asarray(h_ref, np.float64), dtype)
        w = jnp.asarray(down_t, dtype)
        out, out_ref = (sparse_down(h_ref, w, idx, n, backend=be) for be in ("pallas", "reference"))
        assert_close(out, np.asarray(out_ref.astype(jnp.float32), np.float64), dtype)


@pytest.mark.parametrize("b,dtype,activation", [(1, jnp.float32, "relu"),
                                                (3, jnp.float32, "fatrelu"),
                                                (4, jnp.bfloat16, "relu")])
def test_two_stage_kernels_match_references_with_unfired_blocks(b, dtype, activation):
    # Neurons 0..23 never fire (gate rows anti-aligned with a positive x), neurons 24.. are
    # random: whole blocks of the compact order are unfired, others mixed. gate_up must still
    # give act(g) * u (0 where unfired), and down must skip exactly the zero rows of h.
    d, f, dead = 70, 45, 24
    x, gate, up, down_t = weights(b, d, f, dtype, seed=7)
    x = np.abs(x) + 0.1
    gate[:dead] = -np.abs(gate[:dead]) - 0.1
    x, gate = as_dtype(x, dtype), as_dtype(gate, dtype)
    args = [jnp.asarray(a, dtype) for a in (x, gate, up)]
    for count in (dead, f):
        idx = np.zeros(f, np.int32)
        idx[:count] = np.arange(count)  # the unfired neurons lead the compact order
        h = sparse_gate_up_pallas(*args, jnp.asarray(idx), jnp.int32(count),
                                  activation=activation, threshold=FATRELU_THRESHOLD,
                                  interpret=True)
        want = gate_up_numpy(x, gate, up, idx, count, activation)
        assert (np.asarray(h)[:, :dead] == 0).all()
        assert_close(h, want, dtype)
        out = sparse_down_pallas(h, jnp.asarray(down_t, dtype), jnp.asarray(idx), jnp.int32(count),
                                 interpret=True)
        assert_close(out, down_numpy(np.asarray(h, np.float64), down_t, idx, count), dtype)
