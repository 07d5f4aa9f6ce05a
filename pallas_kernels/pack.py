"""Packing sign bits into uint32 words: the layout every predictor op shares.

Convention (tested in tests/test_kernels_pack.py):
- Row `r` of a float array `[..., D]` becomes `ceil(D / 32)` uint32 words; bit `j` (least
  significant first) of word `k` is 1 iff element `32 * k + j` is strictly negative.
- sign(0) is "not negative": +0.0 and -0.0 both give bit 0. The predictor never lets a zero
  input vote (it masks the XOR with the input's non-zero bits, see `pack_nonzero_bits`).
- Padding bits (positions >= D in the last word) are 0 in both the sign and the non-zero words,
  so they never count as a negative product.

`pack_sign_bits` is the on-device op (with the usual backends); `pack_sign_bits_numpy` is the
host-side twin for the converter. Pallas kernel: one program per tile of `block_rows` rows by
`block_words` words, each word's 32 inputs loaded as one `[rows, words, 32]` gather (columns past
D masked to +0, so padding bits stay 0), shifted into place and summed (the bits are disjoint).
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from pallas_kernels import backend as bk
from pallas_kernels.backend import plgpu

WORD_BITS = 32


def num_words(d: int) -> int:
    """Number of uint32 words holding `d` bits."""
    return -(-d // WORD_BITS)


def pack_bits_reference(bits: jnp.ndarray) -> jnp.ndarray:
    """Packs a boolean array `[..., D]` into uint32 words `[..., ceil(D/32)]` (pure jnp)."""
    d = bits.shape[-1]
    pad = num_words(d) * WORD_BITS - d
    bits = jnp.pad(bits, [(0, 0)] * (bits.ndim - 1) + [(0, pad)])
    bits = bits.reshape(*bits.shape[:-1], -1, WORD_BITS).astype(jnp.uint32)
    shifts = jnp.arange(WORD_BITS, dtype=jnp.uint32)
    return jnp.sum(bits << shifts, axis=-1, dtype=jnp.uint32)


def pack_sign_bits_reference(x: jnp.ndarray) -> jnp.ndarray:
    """Sign words of `x: [..., D]` float -> `[..., ceil(D/32)]` uint32 (bit set iff x < 0)."""
    return pack_bits_reference(x < 0)


def pack_nonzero_bits_reference(x: jnp.ndarray) -> jnp.ndarray:
    """Non-zero words of `x: [..., D]` float -> `[..., ceil(D/32)]` uint32 (bit set iff x != 0)."""
    return pack_bits_reference(x != 0)


def pack_sign_bits_numpy(x: np.ndarray) -> np.ndarray:
    """Host-side `pack_sign_bits_reference` for the converter: `[..., D]` -> `[..., W]` uint32."""
    d = x.shape[-1]
    bits = np.asarray(x) < 0
    pad = num_words(d) * WORD_BITS - d
    bits = np.pad(bits, [(0, 0)] * (bits.ndim - 1) + [(0, pad)])
    packed = np.packbits(bits, axis=-1, bitorder="little")
    return np.ascontiguousarray(packed).view("<u4").astype(np.uint32)


BLOCK_ROWS = 16
BLOCK_WORDS = 16


def num_programs(r: int, d: int, *, block_rows: int = BLOCK_ROWS,
                 block_words: int = BLOCK_WORDS) -> int:
    """Programs `pack_sign_bits_pallas` launches for `x: [r, d]` (all of them have work)."""
    w = num_words(d)
    rows, words = min(block_rows, pl.next_power_of_2(r)), min(block_words, pl.next_power_of_2(w))
    return pl.cdiv(r, rows) * pl.cdiv(w, words)


def pack_sign_bits_kernel(x_ref, o_ref, *, block_rows: int, block_words: int):
    """One program: a `[block_rows, block_words]` tile of o_ref `[R, W]` from x_ref `[R, D]`."""
    r, d = x_ref.shape
    w = o_ref.shape[1]
    rows = pl.program_id(0) * block_rows + jnp.arange(block_rows)
    words = pl.program_id(1) * block_words + jnp.arange(block_words)
    bits = jnp.arange(WORD_BITS)
    cols = words[:, None] * WORD_BITS + bits[None, :]
    ok = (rows < r)[:, None, None] & (cols < d)[None]
    v = plgpu.load(x_ref.at[rows[:, None, None], cols[None]], mask=ok, other=0)
    neg = (v.astype(jnp.float32) < 0).astype(jnp.uint32) << bits.astype(jnp.uint32)
    plgpu.store(o_ref.at[rows[:, None], words[None, :]], jnp.sum(neg, axis=2, dtype=jnp.uint32),
                mask=(rows < r)[:, None] & (words < w)[None, :])


@functools.partial(jax.jit, static_argnames=["block_rows", "block_words", "num_warps", "interpret"])
def pack_sign_bits_pallas(x, *, block_rows: int = BLOCK_ROWS, block_words: int = BLOCK_WORDS,
                          num_warps: int = 4, interpret: bool = False):
    """Pallas (Triton) `pack_sign_bits` for `x: [R, D]` -> `[R, ceil(D/32)]` uint32."""
    assert block_rows & (block_rows - 1) == 0 and block_words & (block_words - 1) == 0, (
        "powers of 2 only")
    r, d = x.shape
    w = num_words(d)
    block_rows = min(block_rows, pl.next_power_of_2(r))
    block_words = min(block_words, pl.next_power_of_2(w))
    kernel = functools.partial(pack_sign_bits_kernel, block_rows=block_rows,
                               block_words=block_words)
    return pl.pallas_call(
        kernel,
        grid=(pl.cdiv(r, block_rows), pl.cdiv(w, block_words)),
        out_shape=jax.ShapeDtypeStruct((r, w), jnp.uint32),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps),
        interpret=interpret,
        name="pack_sign_bits",
    )(x)


@functools.partial(jax.jit, static_argnames=["backend"])
def pack_sign_bits(x: jnp.ndarray, *, backend: str = "auto") -> jnp.ndarray:
    """Sign words of `x: [..., D]` float -> `[..., ceil(D/32)]` uint32 (bit set iff x < 0).

    The "xla" backend is the jnp reference (one fused elementwise-and-reduce op already).
    """
    chex.assert_rank(x, {*range(1, 8)})
    if bk.resolve(backend) != "pallas" or x.size == 0:
        return pack_sign_bits_reference(x)
    *lead, d = x.shape
    out = pack_sign_bits_pallas(x.reshape(-1, d), interpret=bk.interpret())
    return out.reshape(*lead, num_words(d))
