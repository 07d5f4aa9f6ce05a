"""The signmag vote as a Pallas Triton kernel: `signmag_pallas`.

One program per block of `block_f` neurons loops over the packed words, the batch a tensor axis
(padded to a power of two) rather than unrolled rows; per magnitude plane it popcounts
`(sign(W) XOR sign(x)) AND plane_p(x)` and adds it shifted by p. The rule: `pallas_kernels.signmag`;
its reference, the one the tests compare against: `pallas_kernels.signmag.signmag_reference`; the
op that dispatches to it: `pallas_kernels.layer.signmag_predict`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.backend import plgpu
from pallas_kernels.gpu.predict import BLOCK_F
from pallas_kernels.signmag import PLANES, x_words


def signmag_kernel(xs_ref, xp_ref, w_ref, n_neg_ref, *, block_f: int, block_w: int,
                   planes: int):
    """One program: neurons [i * block_f, (i + 1) * block_f), looping over the words in chunks.

    Refs (whole arrays): xs_ref `[Bp, W]` uint32 sign words of x; xp_ref `[Bp, planes, W]` plane
    words; w_ref `[F, W]` uint32. Output n_neg_ref `[Bp, F]` int32 weighted negative votes.
    """
    bp, w = xs_ref.shape
    f = w_ref.shape[0]
    rows = pl.program_id(0) * block_f + jnp.arange(block_f)
    row_ok = rows < f
    batch = jnp.arange(bp)

    def body(j, acc):
        cols = j * block_w + jnp.arange(block_w)
        col_ok = cols < w
        # Masked words read as 0, so rows past F and words past W add nothing.
        wb = plgpu.load(w_ref.at[rows[:, None], cols[None, :]],
                        mask=row_ok[:, None] & col_ok[None, :], other=0)
        xs = plgpu.load(xs_ref.at[batch[:, None], cols[None, :]], mask=col_ok[None, :], other=0)
        differ = wb[None, :, :] ^ xs[:, None, :]  # [Bp, block_f, block_w]
        for p in range(planes):
            xp = plgpu.load(xp_ref.at[batch[:, None], p, cols[None, :]], mask=col_ok[None, :],
                            other=0)
            votes = lax.population_count(lax.bitcast_convert_type(differ & xp[:, None, :],
                                                                  jnp.int32))
            acc = acc + (jnp.sum(votes, axis=2) << p)
        return acc

    acc = lax.fori_loop(0, pl.cdiv(w, block_w), body, jnp.zeros((bp, block_f), jnp.int32))
    plgpu.store(n_neg_ref.at[batch[:, None], rows[None, :]], acc, mask=row_ok[None, :])


def num_programs(f: int, *, block_f: int = BLOCK_F) -> int:
    """Programs `signmag_pallas` launches for F neurons (all of them have work)."""
    return pl.cdiv(f, block_f)


@functools.partial(jax.jit,
                   static_argnames=["planes", "block_f", "block_w", "num_warps", "interpret"])
def signmag_pallas(x, w_bits, *, planes: int = PLANES, block_f: int = BLOCK_F, block_w: int = 16,
                   num_warps: int = 4, interpret: bool = False):
    """Pallas (Triton) weighted negative votes `[B, F]` int32 and totals `[B]`."""
    assert block_f & (block_f - 1) == 0 and block_w & (block_w - 1) == 0, "powers of 2 only"
    b = x.shape[0]
    f, w = w_bits.shape
    bp = pl.next_power_of_2(b)
    # Triton blocks need power-of-2 sizes: pad the batch with zero rows (they never vote), and
    # shrink the word chunk as it grows to keep the [Bp, block_f, block_w] tile in registers.
    xs, xp, total = x_words(jnp.pad(x, ((0, bp - b), (0, 0))), planes)
    block_w = max(1, min(block_w // bp, pl.next_power_of_2(w)))
    kernel = functools.partial(signmag_kernel, block_f=block_f, block_w=block_w, planes=planes)
    n_neg = pl.pallas_call(
        kernel,
        grid=(pl.cdiv(f, block_f),),
        out_shape=jax.ShapeDtypeStruct((bp, f), jnp.int32),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps),
        interpret=interpret,
        name="signmag_predict",
    )(xs, xp, w_bits)
    return n_neg[:b], total[:b]
