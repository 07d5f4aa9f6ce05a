"""The sign vote as a Pallas Triton kernel: `sign_predict_pallas`.

One program per block of `block_f` neurons loops over the packed words (`pallas_kernels.pack`),
XORs them with x's sign words, masks with x's non-zero words and popcounts; each batch row is
unrolled. The rule and its integer threshold: `pallas_kernels.predict`. Its reference, the one the
tests compare against: `pallas_kernels.predict.sign_predict_reference`; the op that dispatches to
it: `pallas_kernels.layer.sign_predict`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.backend import plgpu
from pallas_kernels.predict import x_words

# 8 neurons a program: 1376 programs at the 7b shape (F = 11008), 7.3 per SM on the 188 SMs of
# an RTX PRO 6000 (the compile report checks it).
BLOCK_F = 8
BLOCK_W = 32


def num_programs(f: int, *, block_f: int = BLOCK_F) -> int:
    """Programs `sign_predict_pallas` launches for F neurons (all of them have work)."""
    return pl.cdiv(f, block_f)


def sign_predict_kernel(xs_ref, xnz_ref, w_ref, tau_ref, active_ref, n_neg_ref, *,
                        block_f: int, block_w: int):
    """One program: neurons [i * block_f, (i + 1) * block_f), looping over the words in chunks.

    Refs (whole arrays): xs_ref, xnz_ref `[B, W]` uint32 sign / non-zero words of x; w_ref `[F, W]`
    uint32; tau_ref `[B]` int32. Outputs active_ref `[F]` int32 (0/1), n_neg_ref `[B, F]` int32.
    """
    b, w = xs_ref.shape
    f = w_ref.shape[0]
    rows = pl.program_id(0) * block_f + jnp.arange(block_f)
    row_ok = rows < f

    def body(j, acc):
        cols = j * block_w + jnp.arange(block_w)
        col_ok = cols < w
        # Masked words read as 0, so rows past F and words past W add nothing.
        wb = plgpu.load(w_ref.at[rows[:, None], cols[None, :]],
                        mask=row_ok[:, None] & col_ok[None, :], other=0)
        out = []
        for r in range(b):
            xs = plgpu.load(xs_ref.at[r, cols], mask=col_ok, other=0)
            xnz = plgpu.load(xnz_ref.at[r, cols], mask=col_ok, other=0)
            neg = (wb ^ xs[None, :]) & xnz[None, :]
            pop = lax.population_count(lax.bitcast_convert_type(neg, jnp.int32))
            out.append(acc[r] + jnp.sum(pop, axis=1))
        return tuple(out)

    init = tuple(jnp.zeros((block_f,), jnp.int32) for _ in range(b))
    acc = lax.fori_loop(0, pl.cdiv(w, block_w), body, init)
    active = jnp.zeros((block_f,), jnp.bool_)
    for r in range(b):
        plgpu.store(n_neg_ref.at[r, rows], acc[r], mask=row_ok)
        active = active | ~(acc[r] > tau_ref[r])
    plgpu.store(active_ref.at[rows], active.astype(jnp.int32), mask=row_ok)


@functools.partial(jax.jit, static_argnames=["block_f", "block_w", "num_warps", "interpret"])
def sign_predict_pallas(x, w_bits, alpha, *, block_f: int = BLOCK_F, block_w: int = BLOCK_W,
                        num_warps: int = 4, interpret: bool = False):
    """Pallas (Triton) `sign_predict`: grid over blocks of `block_f` neurons.

    Returns (active `[F]` int32 0/1, n_neg `[B, F]` int32); the dispatcher makes the mask bool.
    """
    assert block_f & (block_f - 1) == 0 and block_w & (block_w - 1) == 0, "powers of 2 only"
    b = x.shape[0]
    f, w = w_bits.shape
    xs, xnz, tau = x_words(x, alpha)
    block_w = min(block_w, pl.next_power_of_2(w))
    kernel = functools.partial(sign_predict_kernel, block_f=block_f, block_w=block_w)
    return pl.pallas_call(
        kernel,
        grid=(pl.cdiv(f, block_f),),
        out_shape=[jax.ShapeDtypeStruct((f,), jnp.int32),
                   jax.ShapeDtypeStruct((b, f), jnp.int32)],
        compiler_params=plgpu.CompilerParams(num_warps=num_warps),
        interpret=interpret,
        name="sign_predict",
    )(xs, xnz, w_bits, tau)
