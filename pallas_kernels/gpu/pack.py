"""Sign-bit packing as a Pallas Triton kernel: `pack_sign_bits_pallas`.

One program per tile of `block_rows` rows by `block_words` words, each word's 32 inputs loaded as
one `[rows, words, 32]` gather (columns past D masked to +0, so padding bits stay 0), shifted into
place and summed (the bits are disjoint). The convention and the reference the tests compare
against: `pallas_kernels.pack.pack_sign_bits`. The model packs on the host at load
(`pack_sign_bits_numpy`); this kernel is for packing on a GPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.backend import plgpu
from pallas_kernels.pack import WORD_BITS, num_words

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
