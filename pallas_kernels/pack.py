"""Packing sign bits into uint32 words: the layout every predictor op shares.

Convention (tested in tests/test_kernels_pack.py):
- Row `r` of a float array `[..., D]` becomes `ceil(D / 32)` uint32 words; bit `j` (least
  significant first) of word `k` is 1 iff element `32 * k + j` is strictly negative.
- sign(0) is "not negative": +0.0 and -0.0 both give bit 0. The predictor never lets a zero
  input vote (it masks the XOR with the input's non-zero bits, see `pack_nonzero_bits`).
- Padding bits (positions >= D in the last word) are 0 in both the sign and the non-zero words,
  so they never count as a negative product.

`pack_sign_bits` is the on-device op in jnp (one fused elementwise-and-reduce op in XLA; the
Triton kernel `gpu/pack.py` is tested against it); `pack_sign_bits_numpy` is the host-side twin
for the converter and the loader.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

WORD_BITS = 32


def num_words(d: int) -> int:
    """Number of uint32 words holding `d` bits."""
    return -(-d // WORD_BITS)


def pack_bits(bits: jnp.ndarray) -> jnp.ndarray:
    """Packs a boolean array `[..., D]` into uint32 words `[..., ceil(D/32)]` (pure jnp)."""
    d = bits.shape[-1]
    pad = num_words(d) * WORD_BITS - d
    bits = jnp.pad(bits, [(0, 0)] * (bits.ndim - 1) + [(0, pad)])
    bits = bits.reshape(*bits.shape[:-1], -1, WORD_BITS).astype(jnp.uint32)
    shifts = jnp.arange(WORD_BITS, dtype=jnp.uint32)
    return jnp.sum(bits << shifts, axis=-1, dtype=jnp.uint32)


def pack_sign_bits(x: jnp.ndarray) -> jnp.ndarray:
    """Sign words of `x: [..., D]` float -> `[..., ceil(D/32)]` uint32 (bit set iff x < 0)."""
    return pack_bits(x < 0)


def pack_nonzero_bits(x: jnp.ndarray) -> jnp.ndarray:
    """Non-zero words of `x: [..., D]` float -> `[..., ceil(D/32)]` uint32 (bit set iff x != 0)."""
    return pack_bits(x != 0)


def pack_sign_bits_numpy(x: np.ndarray) -> np.ndarray:
    """Host-side `pack_sign_bits` for the converter: `[..., D]` -> `[..., W]` uint32."""
    d = x.shape[-1]
    bits = np.asarray(x) < 0
    pad = num_words(d) * WORD_BITS - d
    bits = np.pad(bits, [(0, 0)] * (bits.ndim - 1) + [(0, pad)])
    packed = np.packbits(bits, axis=-1, bitorder="little")
    return np.ascontiguousarray(packed).view("<u4").astype(np.uint32)
