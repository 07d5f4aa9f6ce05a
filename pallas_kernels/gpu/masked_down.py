"""The second GPU kernel of a sparse MLP: out = h @ W_down^T over the rows of W_down transposed,
reading only the rows whose h is non-zero, with no id list from outside.

`h: [B, F]` float32 in natural order comes from `predict_gate_up` (0 for every neuron that did
not fire); `down_t: [F, D]` is W_down transposed, one contiguous row per neuron. Grid: (row
blocks of `block_r` neurons) x (column blocks of `block_d`). A program loads its rows' h, keeps
the rows where h is non-zero for some batch row, compacts them in registers (a cumsum gives each
its slot, a compare picks the ids of `slots` at a time) and reads those rows' columns, `slots`
rows a gather: the rows it skips cost no load and no loop step, so a program's steps follow its
live rows, not `block_r`. Products and sums are float32.

Accumulation over the row blocks, `accumulate`:
- "partials" (default; deterministic): each program writes its float32 partial sum to
  `[row blocks, B, D]` and one XLA reduction adds them in a fixed order;
- "atomic": each program adds its partial into a float32 `[B, D]` accumulator with atomics
  (`atom.add.f32`): one kernel, no partials, summation order left to the hardware. The
  accumulator comes in zeroed (`predict_gate_up(zero_out=True)` clears it, so no launch is spent
  on that) and is aliased to the output.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.backend import plgpu

ACCUMULATE = ("partials", "atomic")
# 128 rows x 128 columns a program: 86 x 32 = 2752 programs at the 7b shape (F = 11008,
# D = 4096), all with live rows at 10 % active. A row read is 256 bytes of bf16: two lines.
BLOCK_R = 128
BLOCK_D = 128
SLOTS = 16
# Elements of the `[B padded, slots, block_d]` product tile: slots shrink as the batch grows.
TILE = 4096
NUM_WARPS = 2


def grid(f: int, d: int, *, block_r: int = BLOCK_R, block_d: int = BLOCK_D) -> tuple[int, int]:
    """The kernel's grid for F neurons and D columns."""
    return pl.cdiv(f, block_r), pl.cdiv(d, min(block_d, pl.next_power_of_2(d)))


def num_live_programs(count: int, f: int, d: int, *, block_r: int = BLOCK_R,
                      block_d: int = BLOCK_D) -> int:
    """Programs that read rows when `count` neurons fire, spread over the row blocks (each block
    with one holds live rows)."""
    rows, cols = grid(f, d, block_r=block_r, block_d=block_d)
    return min(rows, count) * cols


def slots_at(b: int, *, slots: int = SLOTS, block_d: int = BLOCK_D, tile: int = TILE) -> int:
    """Rows a gather reads at batch b: `slots`, fewer when B padded x slots x block_d > tile."""
    return max(1, min(slots, tile // (pl.next_power_of_2(b) * block_d)))


def masked_down_kernel(h_ref, w_ref, *refs, block_r: int, block_d: int, slots: int,
                       accumulate: str, interpret: bool):
    """One program: row block r, column block c.

    Refs (whole arrays): h_ref `[B, F]` float32; w_ref `[F, D]`; with "atomic" an input
    accumulator (aliased, unread). Output out_ref: `[row blocks, B, D]` float32 partials, or the
    `[B, D]` accumulator.
    """
    out_ref = refs[-1]
    b, f = h_ref.shape
    d = w_ref.shape[1]
    bs = jnp.arange(pl.next_power_of_2(b))
    b_ok = bs < b
    r = pl.program_id(0)
    rows = r * block_r + jnp.arange(block_r)
    cols = pl.program_id(1) * block_d + jnp.arange(block_d)
    col_ok = cols < d

    hb = plgpu.load(h_ref.at[bs[:, None], rows[None, :]], mask=b_ok[:, None] & (rows < f)[None, :],
                    other=0.0)
    # A sum, not jnp.any: Pallas Triton has no reduce_or.
    live = (jnp.sum((hb != 0).astype(jnp.int32), axis=0) > 0).astype(jnp.int32)
    count = jnp.sum(live)
    slot = jnp.cumsum(live) - 1

    def group(g, acc):
        want = g * slots + jnp.arange(slots)
        hit = (slot[None, :] == want[:, None]) & (live[None, :] > 0)  # [slots, block_r]
        ids = jnp.sum(jnp.where(hit, rows[None, :], 0), axis=1)
        ok = want < count
        hk = plgpu.load(h_ref.at[bs[:, None], ids[None, :]], mask=b_ok[:, None] & ok[None, :],
                        other=0.0)
        w = plgpu.load(w_ref.at[ids[:, None], cols[None, :]], mask=ok[:, None] & col_ok[None, :],
                       other=0).astype(jnp.float32)
        return acc + jnp.sum(hk[:, :, None] * w[None, :, :], axis=1)

    acc = lax.fori_loop(0, pl.cdiv(count, slots), group,
                        jnp.zeros((bs.shape[0], block_d), jnp.float32))
    ok = b_ok[:, None] & col_ok[None, :]
    if accumulate == "partials":
        plgpu.store(out_ref.at[r, bs[:, None], cols[None, :]], acc, mask=ok)
        return
    ok = ok & (count > 0)
    at = out_ref.at[bs[:, None], cols[None, :]]
    if interpret:
        # Interpret mode has no masked atomics, and runs one program at a time: a load and a
        # store add the same.
        plgpu.store(at, plgpu.load(at, mask=ok, other=0.0) + acc, mask=ok)
    else:
        plgpu.atomic_add(out_ref, (bs[:, None], cols[None, :]), acc, mask=ok)


@functools.partial(
    jax.jit,
    static_argnames=["block_r", "block_d", "slots", "tile", "num_warps", "accumulate",
                     "interpret"])
def masked_down_pallas(h, down_t, accumulator=None, *, block_r: int = BLOCK_R,
                       block_d: int = BLOCK_D, slots: int = SLOTS, tile: int = TILE,
                       num_warps: int = NUM_WARPS, accumulate: str = "partials",
                       interpret: bool = False):
    """Pallas (Triton) h @ down_t over the rows where h is non-zero: `[B, D]` float32.

    Args:
      h: `[B, F]` float32; down_t: `[F, D]`.
      accumulator: `[B, D]` float32 zeros, for "atomic" (from `predict_gate_up(zero_out=True)`).
    """
    assert accumulate in ACCUMULATE, accumulate
    assert all(v & (v - 1) == 0 for v in (block_r, block_d, slots)), "powers of 2 only"
    b = h.shape[0]
    f, d = down_t.shape
    block_d = min(block_d, pl.next_power_of_2(d))
    block_r = min(block_r, pl.next_power_of_2(f))
    slots = min(slots_at(b, slots=slots, block_d=block_d, tile=tile), block_r)
    shape = grid(f, d, block_r=block_r, block_d=block_d)
    kernel = functools.partial(masked_down_kernel, block_r=block_r, block_d=block_d, slots=slots,
                               accumulate=accumulate, interpret=interpret)
    call = functools.partial(
        pl.pallas_call, kernel, grid=shape,
        compiler_params=plgpu.CompilerParams(num_warps=num_warps), interpret=interpret,
        name="masked_down")
    if accumulate == "atomic":
        assert accumulator is not None and accumulator.shape == (b, d), "atomic: a [B, D] buffer"
        return call(out_shape=jax.ShapeDtypeStruct((b, d), jnp.float32),
                    input_output_aliases={2: 0})(h, down_t, accumulator)
    partials = call(out_shape=jax.ShapeDtypeStruct((shape[0], b, d), jnp.float32))(h, down_t)
    return jnp.sum(partials, axis=0)


def masked_down_reference(h, down_t):
    """h @ down_t, float32 (plain jnp, every row)."""
    return lax.dot_general(h, down_t.astype(jnp.float32), (((1,), (0,)), ((), ())),
                           precision=lax.Precision.HIGHEST, preferred_element_type=jnp.float32)
