"""The sign-magnitude predictor: the paper's vote, each input weighted by its quantised magnitude.

The sign rule (`predict.py`) counts the non-zero inputs whose product with W_gate's row is
negative, whatever their size. Here input j votes with weight q_j, its magnitude quantised to
`planes` bits relative to the row's largest: q_j = round(|x_j| / max|x| * (2^planes - 1)) (so
small inputs may weigh 0 and not vote, as zero inputs never do). For row b and neuron i:
- total(b) = sum_j q_j;
- N_neg(b, i) = sum_j q_j [x_j W_ij < 0] (W = 0 counts as positive), computed from the packed sign
  bits of W_gate alone as sum_p 2^p popcount((sign(W_i) XOR sign(x)) AND plane_p(x)) over the
  words, plane_p holding bit p of every q_j;
- neuron i is predicted zero iff N_neg > alpha * (total - N_neg): the paper's ratio form on
  weighted votes, with the same knob (alpha >= 0, larger = more conservative, +inf keeps all), and
  the same integer threshold `predict.threshold(alpha, total)`. total - 2 N_neg is x . sign(W_i)
  with x quantised, the 1-bit-weight matvec the issue asks for.

Why bit planes rather than float inputs against unpacked signs: both read only the F * D / 8 bytes
of sign bits, but an XLA CPU loop over unpacked bits measured 20-60x a dense gate matvec (1b
shape), while `planes` popcount passes cost about `planes` times the sign vote. Measured quality
(benchmarks/predictor_sweep.py, shipped model) is in benchmarks/RESULTS.md.

Backends as for `sign_predict`: "reference" on unpacked bits (integer matmuls), "xla" packed XOR
+ popcount, "pallas" a Triton kernel over blocks of neurons that loops over words, the batch a
tensor axis (padded to a power of two) rather than unrolled rows.
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import backend as bk
from pallas_kernels.backend import plgpu
from pallas_kernels.pack import WORD_BITS, num_words, pack_bits_reference, pack_sign_bits_reference
from pallas_kernels.predict import BLOCK_F as PREDICT_BLOCK_F
from pallas_kernels.predict import threshold

PLANES = 3
# As `predict.BLOCK_F`: 8 neurons a program, 1376 programs at the 7b shape.
BLOCK_F = PREDICT_BLOCK_F


def quantise(x: jnp.ndarray, planes: int = PLANES) -> jnp.ndarray:
    """`x: [B, D]` -> q `[B, D]` int32 in [0, 2^planes - 1], |x| relative to each row's max."""
    a = jnp.abs(x.astype(jnp.float32))
    top = jnp.max(a, axis=-1, keepdims=True)
    scale = jnp.where(top > 0, (2**planes - 1) / jnp.where(top > 0, top, 1.0), 0.0)
    return jnp.round(a * scale).astype(jnp.int32)


def x_words(x: jnp.ndarray, planes: int = PLANES):
    """Packed sign words `[B, W]`, plane words `[B, planes, W]` (uint32) and totals `[B]` int32."""
    q = quantise(x, planes)
    plane_words = jnp.stack([pack_bits_reference((q >> p) & 1 == 1) for p in range(planes)], 1)
    return pack_sign_bits_reference(x), plane_words, jnp.sum(q, axis=-1, dtype=jnp.int32)


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


def signmag_xla(x, w_bits, *, planes: int = PLANES):
    """Packed XOR + popcount per plane in plain XLA: (n_neg `[B, F]`, totals `[B]`) int32."""
    xs, xp, total = x_words(x, planes)
    differ = w_bits[None] ^ xs[:, None]  # [B, F, W]
    n_neg = sum(
        jnp.sum(lax.population_count(differ & xp[:, None, p]), axis=-1, dtype=jnp.int32) << p
        for p in range(planes)
    )
    return n_neg, total


def signmag_reference(x, w_bits, *, planes: int = PLANES):
    """The rule on unpacked bits and integer weights (no popcount): (n_neg, totals)."""
    d = x.shape[-1]
    shifts = jnp.arange(WORD_BITS, dtype=jnp.uint32)
    w_neg = ((w_bits[..., None] >> shifts) & 1).reshape(w_bits.shape[0], -1)[:, :d]
    w_neg = w_neg.astype(jnp.int32)
    q = quantise(x, planes)
    q_pos, q_neg = jnp.where(x > 0, q, 0), jnp.where(x < 0, q, 0)
    # A weighted input votes negative iff its sign differs from the weight's (W = 0 positive).
    return q_pos @ w_neg.T + q_neg @ (1 - w_neg).T, jnp.sum(q, axis=-1, dtype=jnp.int32)


@functools.partial(jax.jit, static_argnames=["backend", "planes"])
def signmag_predict(x: jnp.ndarray, w_bits: jnp.ndarray, alpha: jnp.ndarray, *,
                    backend: str = "auto", planes: int = PLANES
                    ) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """Predicts the active neurons from sign bits and quantised input magnitudes (module doc).

    Args:
      x: `[B, D]` float MLP input.
      w_bits: `[F, ceil(D/32)]` uint32 packed sign bits of W_gate (`pack.py`).
      alpha: `[]` float32 conservativeness (data: changing it does not recompile).
      backend: one of `backend.BACKENDS`.
      planes: bits of each input's quantised magnitude (static).

    Returns:
      active: `[F]` bool, predicted active for at least one row (the union over B).
      n_neg: `[B, F]` int32 weighted negative votes.
      total: `[B]` int32 total weight of each row's votes (the rule's "n" for `threshold`).
    """
    alpha = jnp.asarray(alpha, jnp.float32)
    chex.assert_rank([x, alpha], [2, 0])
    chex.assert_shape(w_bits, (None, num_words(x.shape[-1])))
    chex.assert_type(w_bits, jnp.uint32)
    match bk.resolve(backend):
        case "pallas":
            n_neg, total = signmag_pallas(x, w_bits, planes=planes, interpret=bk.interpret())
        case "xla":
            n_neg, total = signmag_xla(x, w_bits, planes=planes)
        case _:
            n_neg, total = signmag_reference(x, w_bits, planes=planes)
    tau = threshold(alpha, total)
    return jnp.any(n_neg <= tau[:, None], axis=0), n_neg, total
