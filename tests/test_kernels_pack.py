"""Sign-bit packing: the convention, the jnp op `pack_sign_bits`, its Triton kernel, lowering."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl

from pallas_kernels import backend as bk
from pallas_kernels.gpu.pack import pack_sign_bits_pallas
from pallas_kernels.gpu.triton_check import triton_modules
from pallas_kernels.pack import (
    num_words,
    pack_nonzero_bits,
    pack_sign_bits,
    pack_sign_bits_numpy,
)

# The jnp op, and the Triton kernel on rows (interpret mode off a GPU).
FACES = ("pallas", "jnp")


def pack(x, face):
    if face == "jnp" or x.size == 0:
        return pack_sign_bits(x)
    *lead, d = x.shape
    out = pack_sign_bits_pallas(x.reshape(-1, d), interpret=bk.interpret())
    return out.reshape(*lead, num_words(d))


def pack_loop(x: np.ndarray, predicate) -> np.ndarray:
    """The convention spelled out bit by bit: bit j of word k <- predicate(x[..., 32k + j])."""
    *lead, d = x.shape
    flat = x.reshape(-1, d)
    out = np.zeros((flat.shape[0], num_words(d)), np.uint32)
    for r in range(flat.shape[0]):
        for j in range(d):
            if predicate(flat[r, j]):
                out[r, j // 32] |= np.uint32(1 << (j % 32))
    return out.reshape(*lead, num_words(d))


def signed_input(shape, seed: int, dtype=np.float32) -> np.ndarray:
    """Random values with +0.0 and -0.0 sprinkled in (both must pack as "not negative")."""
    x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    x.flat[::7] = 0.0
    x.flat[3::11] = -0.0
    return np.asarray(jnp.asarray(x, dtype).astype(jnp.float32))


@pytest.mark.parametrize("d", [1, 31, 32, 33, 70, 96])
def test_numpy_packer_follows_convention(d):
    x = signed_input((3, d), seed=d)
    np.testing.assert_array_equal(pack_sign_bits_numpy(x), pack_loop(x, lambda v: v < 0))
    np.testing.assert_array_equal(np.asarray(pack_nonzero_bits(jnp.asarray(x))),
                                  pack_loop(x, lambda v: v != 0))


@pytest.mark.parametrize("face", FACES)
@pytest.mark.parametrize("shape,dtype", [((3, 70), jnp.float32), ((2, 3, 96), jnp.bfloat16),
                                         ((45,), jnp.float32)])
def test_pack_sign_bits_faces(face, shape, dtype):
    # Random words are non-zero with overwhelming probability, so a word the kernel never wrote
    # (Pallas interpret mode leaves unsigned outputs at 0) would show as a mismatch.
    x = signed_input(shape, seed=len(shape), dtype=dtype)
    got = pack(jnp.asarray(x, dtype), face)
    assert got.dtype == jnp.uint32 and got.shape == (*shape[:-1], num_words(shape[-1]))
    np.testing.assert_array_equal(np.asarray(got), pack_sign_bits_numpy(x))


@pytest.mark.parametrize("face", FACES)
def test_padding_bits_are_zero(face):
    # All negative: every real bit is 1 (so no word can be left unwritten unseen), padding 0.
    d = 70
    got = np.asarray(pack(-jnp.ones((5, d)), face))
    np.testing.assert_array_equal(got[:, :2], np.uint32(0xFFFFFFFF))
    np.testing.assert_array_equal(got[:, 2], np.uint32((1 << (d - 64)) - 1))


@pytest.mark.parametrize("block_rows,block_words", [(1, 1), (4, 2), (16, 16)])
def test_pack_block_sizes(block_rows, block_words):
    x = signed_input((9, 130), seed=block_rows)
    got = pack_sign_bits_pallas(jnp.asarray(x), block_rows=block_rows, block_words=block_words,
                                interpret=True)
    np.testing.assert_array_equal(np.asarray(got), pack_sign_bits_numpy(x))


def test_interpret_mode_poisons_unwritten_outputs():
    """The premise of the kernel tests: an output element no program writes reads as NaN/INT_MIN."""

    def kernel(f_ref, i_ref):
        del f_ref, i_ref

    f, i = pl.pallas_call(kernel, out_shape=[jax.ShapeDtypeStruct((4,), jnp.float32),
                                             jax.ShapeDtypeStruct((4,), jnp.int32)],
                          interpret=True)()
    assert np.isnan(np.asarray(f)).all()
    assert (np.asarray(i) == np.iinfo(np.int32).min).all()


def test_pack_lowers_to_triton():
    for dtype in (jnp.float32, jnp.bfloat16):
        (module,) = triton_modules(pack_sign_bits_pallas, jnp.ones((20, 100), dtype))
        assert "tt.func" in module


@pytest.mark.gpu
@pytest.mark.skipif(not bk.on_gpu(), reason="needs a GPU")
def test_pack_compiled_on_gpu():
    x = signed_input((300, 4100), seed=0)
    got = pack(jnp.asarray(x), "pallas")
    np.testing.assert_array_equal(np.asarray(got), pack_sign_bits_numpy(x))
