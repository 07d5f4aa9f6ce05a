"""The first GPU kernel of a sparse MLP: predict, then gate and up, over blocks of neurons in
natural order, with no id list between them.

One program takes neurons [i * block_f, (i + 1) * block_f) and
1. votes each neuron from the packed sign bits of W_gate (`pallas_kernels.predict`'s rule for
   "sign", `signmag`'s for "signmag"), packing x's sign, non-zero and magnitude words itself, so no
   XLA op runs before it; or, for "mask", reads a given active mask (an oracle's, or a union
   over a mesh axis: `gpu/layer.py`);
2. reads the gate rows of the neurons some row predicts active, only those: the block's active
   neurons are compacted in registers (a cumsum gives each its slot, a compare picks the ids of
   `slots` of them at a time), and each group of `slots` rows is one gather over D in chunks;
3. reads the up rows, the same way, only of the neurons whose activated gate is non-zero for
   some row (they *fire*);
4. writes h = act(gate . x) * (up . x) for its fired neurons and 0 elsewhere, `[B, F]` float32 in
   natural order, plus its neurons' flags (1 = computed, i.e. predicted active for some row,
   2 = fired) and how many (row, neuron) pairs it predicted active: the op's counts.

Products and sums are float32 whatever the input dtype; the batch is a tile axis padded to a
power of two. Optionally (`zero_out`) each program also zeroes a slice of a `[B, D]` float32
buffer: the accumulator that `masked_down`'s atomic variant adds into, cleared here so that
variant needs no launch of its own.

The vote is exact against `predict.sign_predict_reference` and `signmag.signmag_reference`:
signmag's scale 7 / max|x| and each |x| * scale are rounded once as on the CPU (`ieee`), and
rounded to integers half to even as `jnp.round` does.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.backend import plgpu
from pallas_kernels.contract import activate, matmul_t
from pallas_kernels.pack import WORD_BITS
from pallas_kernels.predict import threshold_rule
from pallas_kernels.signmag import PLANES

VOTES = ("sign", "signmag", "mask")
# 8 neurons a program: 1376 programs at the 7b shape (F = 11008), all of which vote: 7.3 per SM
# on the 188 SMs of an RTX PRO 6000, the most of the GPUs the compile report knows.
BLOCK_F = 8
# One active neuron's rows at a time, each read in `TILE`-column gathers (2 KiB of a 7b bf16 row in
# flight per program at batch 1): at 10 % active a block holds 0.8 active neurons on average.
SLOTS = 1
# Elements of a gate/up step's product tile (`[B padded, slots, block_d]`: a quarter of a 7b row
# at batch 1, 8 elements a thread) and of x in a vote step (`[B padded, words, 32]`: all of a 7b x
# at batch 1). With 4 warps that is 40-96 registers at batch 1 to 16 on the shipped specs, no
# spill with jax 0.10.2 and 8-16 bytes at some batch sizes with 0.12, where ptxas caps registers
# for occupancy (the compile report); 2 warps took 124-165 registers, and with 0.10.2 a
# 4096-element tile spilled 8-16 bytes on sm_86 and sm_100, a 2048-element one 8 on sm_86.
TILE = 1024
VOTE_TILE = 4096
MIN_BLOCK_D = 128
NUM_WARPS = 4
# Columns of the `[B, D]` accumulator a program zeroes (`zero_out`): the first programs do it all.
ZERO_BLOCK = 128


def num_programs(f: int, *, block_f: int = BLOCK_F) -> int:
    """Programs the kernel launches for F neurons: every one of them votes."""
    return pl.cdiv(f, block_f)


def ieee(op: str, a: jnp.ndarray, b: jnp.ndarray, interpret: bool) -> jnp.ndarray:
    """float32 a / b ("div") or a * b ("mul") rounded once, as `jnp` on the CPU does, in a kernel.

    On a GPU through inline PTX (`div.rn.f32`, `mul.rn.f32`): Triton's `/` is `div.full`
    (within 2 ulp), and a plain product feeding an add may be fused into an `fma`, which skips
    the product's rounding; an explicitly rounded PTX op is neither.
    """
    if interpret:
        return a / b if op == "div" else a * b
    (out,) = plgpu.elementwise_inline_asm(
        f"{op}.rn.f32 $0, $1, $2;", args=[a, b], constraints="=r,r,r", pack=1,
        result_shape_dtypes=[jax.ShapeDtypeStruct(a.shape, jnp.float32)])
    return out


def round_half_even(v: jnp.ndarray) -> jnp.ndarray:
    """`jnp.round` of float32 v in [0, 2^22) with floor and compares (Triton has no round)."""
    r = jnp.floor(v + 0.5)  # exact in this range
    odd_tie = (r - v == 0.5) & (r - 2.0 * jnp.floor(r * 0.5) == 1.0)
    return jnp.where(odd_tie, r - 1.0, r)


def _x_tile(x_ref, words, bs, b_ok):
    """x's inputs of `words` as a float32 `[B padded, words, 32]` tile (0 past D and B)."""
    d = x_ref.shape[1]
    cols = words[:, None] * WORD_BITS + jnp.arange(WORD_BITS)[None, :]
    ok = b_ok[:, None, None] & (cols < d)[None]
    return plgpu.load(x_ref.at[bs[:, None, None], cols[None]], mask=ok, other=0).astype(
        jnp.float32)


def _pack(bits: jnp.ndarray) -> jnp.ndarray:
    """`[..., 32]` bool -> `[...]` uint32 words (bit j = element j)."""
    shifts = jnp.arange(WORD_BITS).astype(jnp.uint32)
    return jnp.sum(bits.astype(jnp.uint32) << shifts, axis=-1, dtype=jnp.uint32)


def _popcount(words: jnp.ndarray) -> jnp.ndarray:
    return lax.population_count(lax.bitcast_convert_type(words, jnp.int32))


def _vote(x_ref, bits_ref, alpha_ref, rows, row_ok, bs, b_ok, *, vote: str, block_w: int,
          block_d: int, interpret: bool):
    """The predictor for the block: per-row active `[B padded, block_f]` bool."""
    bp = bs.shape[0]
    d = x_ref.shape[1]
    w = bits_ref.shape[1]
    words0 = jnp.arange(block_w)

    def weight_words(words):
        return plgpu.load(bits_ref.at[rows[:, None], words[None, :]],
                          mask=row_ok[:, None] & (words < w)[None, :], other=0)

    if vote == "sign":
        def body(j, carry):
            n_neg, n_nz = carry
            words = j * block_w + words0
            xv = _x_tile(x_ref, words, bs, b_ok)
            xs, nonzero = _pack(xv < 0), _pack(xv != 0)
            differ = weight_words(words)[None] ^ xs[:, None]
            n_neg = n_neg + jnp.sum(_popcount(differ & nonzero[:, None]), axis=2)
            return n_neg, n_nz + jnp.sum(_popcount(nonzero), axis=1)
    else:
        def top_body(j, top):
            cols = j * block_d + jnp.arange(block_d)
            xv = plgpu.load(x_ref.at[bs[:, None], cols[None, :]],
                            mask=b_ok[:, None] & (cols < d)[None, :], other=0)
            return jnp.maximum(top, jnp.max(jnp.abs(xv.astype(jnp.float32)), axis=1))

        top = lax.fori_loop(0, pl.cdiv(d, block_d), top_body, jnp.zeros((bp,), jnp.float32))
        levels = jnp.full((bp,), 2.0**PLANES - 1, jnp.float32)
        scale = jnp.where(top > 0, ieee("div", levels, jnp.where(top > 0, top, 1.0), interpret),
                          0.0)

        def body(j, carry):
            n_neg, total = carry
            words = j * block_w + words0
            xv = _x_tile(x_ref, words, bs, b_ok)
            a = jnp.abs(xv)
            q = round_half_even(ieee("mul", a, jnp.broadcast_to(scale[:, None, None], a.shape),
                                     interpret)).astype(jnp.int32)
            differ = weight_words(words)[None] ^ _pack(xv < 0)[:, None]
            for p in range(PLANES):
                plane = _pack(((q >> p) & 1) == 1)
                n_neg = n_neg + (jnp.sum(_popcount(differ & plane[:, None]), axis=2) << p)
            return n_neg, total + jnp.sum(jnp.sum(q, axis=2), axis=1)

    init = (jnp.zeros((bp, rows.shape[0]), jnp.int32), jnp.zeros((bp,), jnp.int32))
    n_neg, n = lax.fori_loop(0, pl.cdiv(w, block_w), body, init)
    tau = threshold_rule(alpha_ref[()], n)
    return (n_neg <= tau[:, None]) & b_ok[:, None] & row_ok[None, :]


def gathered_matvecs(x_ref, w_ref, rows, on, bs, b_ok, *, slots: int, block_d: int):
    """x . w_ref[r] for the rows r of the block where `on`: `[B padded, block_f]` float32, 0
    elsewhere. The `on` rows are compacted in registers and read `slots` at a time; a row that is
    not on is never loaded, and a block with none skips the loop."""
    d = x_ref.shape[1]
    on_i = on.astype(jnp.int32)
    count = jnp.sum(on_i)
    slot = jnp.cumsum(on_i) - 1

    def group(g, out):
        want = g * slots + jnp.arange(slots)
        hit = (slot[None, :] == want[:, None]) & on[None, :]  # [slots, block_f]
        ids = jnp.sum(jnp.where(hit, rows[None, :], 0), axis=1)
        ok = want < count

        def chunk(j, acc):
            cols = j * block_d + jnp.arange(block_d)
            col_ok = cols < d
            xv = plgpu.load(x_ref.at[bs[:, None], cols[None, :]],
                            mask=b_ok[:, None] & col_ok[None, :], other=0).astype(jnp.float32)
            wv = plgpu.load(w_ref.at[ids[:, None], cols[None, :]],
                            mask=ok[:, None] & col_ok[None, :], other=0).astype(jnp.float32)
            return acc + jnp.sum(xv[:, None, :] * wv[None, :, :], axis=2)

        acc = lax.fori_loop(0, pl.cdiv(d, block_d), chunk,
                            jnp.zeros((bs.shape[0], slots), jnp.float32))
        # Back to the block's natural order: each slot's value lands on its one neuron, exactly.
        return out + jnp.sum(jnp.where(hit[None], acc[:, :, None], 0.0), axis=1)

    return lax.fori_loop(0, pl.cdiv(count, slots), group,
                         jnp.zeros((bs.shape[0], rows.shape[0]), jnp.float32))


def predict_gate_up_kernel(*refs, vote: str, activation: str, threshold: float, block_f: int,
                           slots: int, block_d: int, block_w: int, zero_block: int,
                           interpret: bool):
    """One program: neurons [i * block_f, (i + 1) * block_f).

    Refs (whole arrays): x_ref `[B, D]`; then alpha_ref `[]` float32 and bits_ref `[F, W]` uint32
    (sign, signmag) or mask_ref `[F]` int32 (mask); gate_ref, up_ref `[F, D]`. Outputs: h_ref
    `[B, F]` float32, flags_ref `[F]` int32, predicted_ref `[programs]` int32, and with
    `zero_block` zero_ref `[B, D]` float32.
    """
    if vote == "mask":
        x_ref, mask_ref, gate_ref, up_ref, h_ref, flags_ref, predicted_ref, *zero_ref = refs
    else:
        x_ref, alpha_ref, bits_ref, gate_ref, up_ref, h_ref, flags_ref, predicted_ref, *zero_ref = (
            refs)
    b, d = x_ref.shape
    f = gate_ref.shape[0]
    i = pl.program_id(0)
    bs = jnp.arange(pl.next_power_of_2(b))
    b_ok = bs < b
    rows = i * block_f + jnp.arange(block_f)
    row_ok = rows < f
    if zero_ref:  # columns [i * zero_block, (i + 1) * zero_block) of every row, first
        cols = i * zero_block + jnp.arange(zero_block)
        plgpu.store(zero_ref[0].at[bs[:, None], cols[None, :]],
                    jnp.zeros((bs.shape[0], zero_block), jnp.float32),
                    mask=b_ok[:, None] & (cols < d)[None, :])

    if vote == "mask":
        active = plgpu.load(mask_ref.at[rows], mask=row_ok, other=0) != 0
        predicted = jnp.int32(0)
    else:
        per_row = _vote(x_ref, bits_ref, alpha_ref, rows, row_ok, bs, b_ok, vote=vote,
                        block_w=block_w, block_d=block_d, interpret=interpret)
        # A sum, not jnp.any: Pallas Triton has no reduce_or. One axis at a time: jax 0.12's
        # Triton lowering of a two-axis reduction fails under an abstract mesh.
        per_neuron = jnp.sum(per_row.astype(jnp.int32), axis=0)
        predicted = jnp.sum(per_neuron)
        active = per_neuron > 0

    matvecs = functools.partial(gathered_matvecs, x_ref, rows=rows, bs=bs, b_ok=b_ok, slots=slots,
                                block_d=block_d)
    a = jnp.where(b_ok[:, None], activate(matvecs(gate_ref, on=active), activation, threshold), 0.0)
    fired = active & (jnp.sum((a != 0).astype(jnp.int32), axis=0) > 0)
    u = matvecs(up_ref, on=fired)
    plgpu.store(h_ref.at[bs[:, None], rows[None, :]], jnp.where(fired[None, :], a * u, 0.0),
                mask=b_ok[:, None] & row_ok[None, :])
    plgpu.store(flags_ref.at[rows], active.astype(jnp.int32) + 2 * fired.astype(jnp.int32),
                mask=row_ok)
    plgpu.store(predicted_ref.at[i + jnp.arange(1)], jnp.full((1,), predicted, jnp.int32))


def block_sizes(b: int, d: int, *, slots: int = SLOTS, tile: int = TILE,
                vote_tile: int = VOTE_TILE) -> tuple[int, int]:
    """(block_d, block_w) at batch b: a gate/up step's columns and a vote step's words."""
    bp = pl.next_power_of_2(b)
    block_d = min(max(MIN_BLOCK_D, tile // (bp * slots)), pl.next_power_of_2(d))
    block_w = min(max(1, vote_tile // (bp * WORD_BITS)),
                  pl.next_power_of_2(pl.cdiv(d, WORD_BITS)))
    return block_d, block_w


@functools.partial(
    jax.jit,
    static_argnames=["vote", "activation", "threshold", "block_f", "slots", "tile", "vote_tile",
                     "num_warps", "zero_out", "interpret"])
def predict_gate_up_pallas(x, gate, up, *, alpha=None, bits=None, mask=None, vote: str = "sign",
                           activation: str = "relu", threshold: float = 0.0,
                           block_f: int = BLOCK_F, slots: int = SLOTS, tile: int = TILE,
                           vote_tile: int = VOTE_TILE, num_warps: int = NUM_WARPS,
                           zero_out: bool = False,
                           interpret: bool = False):
    """Pallas (Triton) predict + gate + up over blocks of `block_f` neurons.

    Args:
      x: `[B, D]` MLP input; gate, up: `[F, D]`.
      alpha: `[]` float32 and bits: `[F, ceil(D/32)]` uint32 for vote "sign" / "signmag";
        mask: `[F]` bool or int (non-zero = active) for vote "mask".
      zero_out: also return a `[B, D]` float32 buffer of zeros (see the module docstring).

    Returns:
      h `[B, F]` float32 (0 where not fired), flags `[F]` int32 (1 computed + 2 fired),
      predicted `[programs]` int32 per-program (row, neuron) active pairs (0 for "mask"), and
      with `zero_out` the zeroed buffer.
    """
    assert vote in VOTES, vote
    assert block_f & (block_f - 1) == 0 and slots & (slots - 1) == 0 and slots <= block_f, (
        "block_f, slots: powers of 2, slots <= block_f")
    b, d = x.shape
    f = gate.shape[0]
    grid = num_programs(f, block_f=block_f)
    block_d, block_w = block_sizes(b, d, slots=slots, tile=tile, vote_tile=vote_tile)
    zero_block = max(ZERO_BLOCK, pl.next_power_of_2(pl.cdiv(d, grid))) if zero_out else 0
    kernel = functools.partial(
        predict_gate_up_kernel, vote=vote, activation=activation, threshold=threshold,
        block_f=block_f, slots=slots, block_d=block_d, block_w=block_w, zero_block=zero_block,
        interpret=interpret)
    if vote == "mask":
        inputs = (x, mask.astype(jnp.int32), gate, up)
    else:
        inputs = (x, jnp.asarray(alpha, jnp.float32), bits, gate, up)
    out_shape = [jax.ShapeDtypeStruct((b, f), jnp.float32), jax.ShapeDtypeStruct((f,), jnp.int32),
                 jax.ShapeDtypeStruct((grid,), jnp.int32)]
    if zero_out:
        out_shape.append(jax.ShapeDtypeStruct((b, d), jnp.float32))
    return pl.pallas_call(
        kernel,
        grid=(grid,),
        out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(num_warps=num_warps),
        interpret=interpret,
        name="predict_gate_up",
    )(*inputs)


def predict_gate_up_reference(x, gate, up, active, *, activation: str, threshold: float):
    """What the kernel computes for a union mask `active: [F]` bool, in plain jnp:
    (h `[B, F]` float32, fired `[F]` bool)."""
    hp = lax.Precision.HIGHEST
    a = jnp.where(active, activate(matmul_t(x, gate, precision=hp), activation, threshold), 0.0)
    fired = jnp.any(a != 0, axis=0)
    return jnp.where(fired, a * matmul_t(x, up, precision=hp), 0.0), fired
