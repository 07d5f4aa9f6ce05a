"""The older GPU chain (`gpu/chain.py`): `sparse_gate_up` and `sparse_down` against their
references, in interpret mode here and compiled on a GPU, and the whole chain."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from kernel_cases import (
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
from pallas_kernels import compact, pack_sign_bits_numpy, sign_predict
from pallas_kernels.gpu.chain import (
    chain_mlp,
    sparse_down_pallas,
    sparse_down_reference,
    sparse_gate_up_pallas,
    sparse_gate_up_reference,
)
from pallas_kernels.gpu.triton_check import triton_modules

# Each kernel and its reference: both must equal numpy. Off a GPU the kernels run in interpret
# mode, which fills unwritten float outputs with NaN, so a skipped store fails here.
FACES = ("pallas", "reference")


def gate_up(face, *args, **kw):
    if face == "pallas":
        return sparse_gate_up_pallas(*args, **kw, interpret=bk.interpret())
    return sparse_gate_up_reference(*args, **kw)


def down(face, *args):
    if face == "pallas":
        return sparse_down_pallas(*args, interpret=bk.interpret())
    return sparse_down_reference(*args)


@pytest.mark.parametrize("face", FACES)
@pytest.mark.parametrize("b,d,f,dtype,activation", CASES)
def test_sparse_gate_up(face, b, d, f, dtype, activation):
    x, gate, up, _ = weights(b, d, f, dtype, seed=f)
    run = jax.jit(functools.partial(gate_up, face, activation=activation,
                                    threshold=FATRELU_THRESHOLD))
    args = [jnp.asarray(a, dtype) for a in (x, gate, up)]
    for count in counts_for(f):
        idx = index_list(f, count, seed=count)
        h = run(*args, jnp.asarray(idx), jnp.int32(count))
        assert h.dtype == jnp.float32 and h.shape == (b, f)
        want = gate_up_numpy(x, gate, up, idx, count, activation)
        assert_close(h, want, dtype)
        assert (np.asarray(h)[:, count:] == 0).all(), f"count={count}"


@pytest.mark.parametrize("face", FACES)
@pytest.mark.parametrize("b,d,f,dtype,activation", CASES)
def test_sparse_down(face, b, d, f, dtype, activation):
    del activation
    x, _, _, down_t = weights(b, d, f, dtype, seed=d)
    h = np.random.default_rng(1).standard_normal((b, f)).astype(np.float32)
    run = jax.jit(functools.partial(down, face))
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


@pytest.mark.parametrize("face", FACES)
def test_fatrelu_is_strict(face):
    # x = e_0, so each pre-activation is exactly gate[i, 0]: z == threshold must give 0.
    d, f = 40, 8
    x = jnp.zeros((1, d)).at[0, 0].set(1.0)
    z = jnp.asarray([0.5, np.nextafter(np.float32(0.5), np.float32(1)), -1.0, 2.0, 0.0, 0.25,
                     0.5, 1.0], jnp.float32)
    gate = jnp.zeros((f, d)).at[:, 0].set(z)
    up = jnp.ones((f, d))
    h = gate_up(face, x, gate, up, jnp.arange(f, dtype=jnp.int32), jnp.int32(f),
                activation="fatrelu", threshold=0.5)
    np.testing.assert_array_equal(np.asarray(h)[0], np.where(z > 0.5, z, 0.0))


def test_chain_matches_masked_dense_mlp():
    """predict -> compact -> gate_up -> down equals the dense MLP over the predicted neurons."""
    b, d, f = 2, 96, 200
    x, gate, up, down_t = weights(b, d, f, jnp.float32, seed=7)
    w_bits = jnp.asarray(pack_sign_bits_numpy(gate))

    @jax.jit
    def chain(x, alpha):
        active, _ = sign_predict(x, w_bits, alpha, backend="pallas")
        idx, count = compact(active)
        out, _ = chain_mlp(x, jnp.asarray(gate, jnp.float32), jnp.asarray(up, jnp.float32),
                           jnp.asarray(down_t, jnp.float32), idx, count, interpret=True)
        return out, active

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
        kernel = functools.partial(sparse_gate_up_pallas, activation=activation, threshold=0.1)
        assert len(triton_modules(kernel, jnp.ones((b, d), dtype), w, w, idx, count)) == 1
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
        h, h_ref = (gate_up(face, *args, idx, n, activation=activation,
                            threshold=FATRELU_THRESHOLD) for face in FACES)
        assert_close(h, np.asarray(h_ref, np.float64), dtype)
        w = jnp.asarray(down_t, dtype)
        out, out_ref = (down(face, h_ref, w, idx, n) for face in FACES)
        assert_close(out, np.asarray(out_ref.astype(jnp.float32), np.float64), dtype)


@pytest.mark.parametrize("b,dtype,activation", [(1, jnp.float32, "relu"),
                                                (3, jnp.float32, "fatrelu"),
                                                (4, jnp.bfloat16, "relu")])
def test_kernels_match_references_with_unfired_blocks(b, dtype, activation):
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
