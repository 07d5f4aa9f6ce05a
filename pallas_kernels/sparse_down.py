"""Down projection over the active neurons only: out = sum_{k < count} h[:, k] * down_t[idx[k]].

`h: [B, F]` float32 comes from `sparse_gate_up` in compact order; `down_t: [F, D]` is W_down
transposed, so each neuron's down column is a contiguous row. Products and sums are float32; the
result is cast to down_t's dtype.

Pallas kernel: grid (D blocks of `block_d`) x (`num_splits` splits of the live prefix). The live
positions [0, count) are cut into `num_splits` equal runs of whole `block_n` blocks, so every
split has work whatever the count; each program sums its run for its columns into a float32
partial `[num_splits, B, D]`, and one jnp sum reduces the splits (deterministic, unlike atomics).
The batch is a tile axis (padded to a power of 2): the accumulator is `[B padded, block_d]`, and
each position adds h[:, k] x down_t[idx[k]], whose row is read only if h[:, k] is non-zero for
some batch row (a block whose h is all zero loads no weights). A program whose run is empty
loads nothing and writes zeros; bytes read follow the count. At 10% active a 7b layer has
64 x 23 = 1472 programs with work: 11.2 per SM of an H100, 7.8 on an RTX PRO 6000 (188 SMs).
Each row load is block_d (64) bf16 columns, 128 bytes: one full cache line.
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
from pallas_kernels.sparse_gate_up import matmul_t


def _cdiv(a, b: int):
    """Ceiling division of a non-negative traced int by a static int (plain lax.div)."""
    return lax.div(a + (b - 1), b)


BLOCK_N = 16
BLOCK_D = 64
NUM_SPLITS = 24
# 2 warps for 64 columns: on the H200 (2026-11-29, benchmarks/gpu_variants.py, 10% of a 7b layer)
# 20.4 us against 25.5 with 4 warps.
NUM_WARPS = 2


def num_live_programs(count: int, d: int, *, block_n: int = BLOCK_N, block_d: int = BLOCK_D,
                      num_splits: int = NUM_SPLITS) -> int:
    """Programs of `sparse_down_pallas` that load weights when `count` neurons are active."""
    run = pl.cdiv(pl.cdiv(count, block_n), num_splits) * block_n
    return pl.cdiv(d, min(block_d, pl.next_power_of_2(d))) * pl.cdiv(count, run)


def sparse_down_kernel(h_ref, w_ref, idx_ref, count_ref, out_ref, *,
                       block_n: int, block_d: int, num_splits: int):
    """One program: columns block i, split s of the live prefix.

    Refs (whole arrays): h_ref `[B, F]` float32 compact order; w_ref `[F, D]`; idx_ref `[F]`
    int32; count_ref `[]` int32. Output out_ref `[num_splits, B, D]` float32 partial sums.
    """
    b, f = h_ref.shape
    d = w_ref.shape[1]
    bs = jnp.arange(pl.next_power_of_2(b))
    b_ok = bs < b
    cols = pl.program_id(0) * block_d + jnp.arange(block_d)
    col_ok = cols < d
    s = pl.program_id(1)
    count = count_ref[()]
    run = _cdiv(_cdiv(count, block_n), num_splits) * block_n
    start = s * run
    num_blocks = _cdiv(jnp.clip(count - start, 0, run), block_n)

    def operand(j, i):
        """Position i of block j of the run: its h column `[B padded]`, its row id, and whether
        the row is read (live, and h non-zero for some batch row)."""
        k = start + j * block_n + i
        live = (k < count) & (j < num_blocks)
        hk = plgpu.load(h_ref.at[bs, jnp.minimum(k, f - 1)], mask=b_ok & live, other=0.0)
        # A sum, not jnp.any: Pallas Triton has no reduce_or.
        read = live & (jnp.sum((hk != 0).astype(jnp.int32)) > 0)
        return hk, jnp.where(live, idx_ref[jnp.minimum(k, f - 1)], 0), read

    def accumulate(acc, hk, row, read):
        w = plgpu.load(w_ref.at[row, cols], mask=col_ok & read, other=0)
        return acc + hk[:, None] * w.astype(jnp.float32)[None, :]

    def body(j, acc):
        for i in range(block_n):
            acc = accumulate(acc, *operand(j, i))
        return acc

    acc = lax.fori_loop(jnp.int32(0), num_blocks, body,
                        jnp.zeros((bs.shape[0], block_d), jnp.float32))
    plgpu.store(out_ref.at[s, bs[:, None], cols[None, :]], acc,
                mask=b_ok[:, None] & col_ok[None, :])


@functools.partial(
    jax.jit, static_argnames=["block_n", "block_d", "num_splits", "num_warps", "interpret"])
def sparse_down_pallas(h, down_t, idx, count, *, block_n: int = BLOCK_N, block_d: int = BLOCK_D,
                       num_splits: int = NUM_SPLITS, num_warps: int = NUM_WARPS,
                       interpret: bool = False):
    """Pallas (Triton) `sparse_down`: partial sums per (column block, split), reduced in jnp."""
    assert block_n & (block_n - 1) == 0 and block_d & (block_d - 1) == 0, "powers of 2 only"
    b = h.shape[0]
    d = down_t.shape[1]
    block_d = min(block_d, pl.next_power_of_2(d))
    kernel = functools.partial(sparse_down_kernel, block_n=block_n, block_d=block_d,
                               num_splits=num_splits)
    partial = pl.pallas_call(
        kernel,
        grid=(pl.cdiv(d, block_d), num_splits),
        out_shape=jax.ShapeDtypeStruct((num_splits, b, d), jnp.float32),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps),
        interpret=interpret,
        name="sparse_down",
    )(h, down_t, idx, count)
    return jnp.sum(partial, axis=0).astype(down_t.dtype)


def matmul(h: jnp.ndarray, w: jnp.ndarray) -> jnp.ndarray:
    """`h: [B, K]` float32 times `w: [K, D]` -> `[B, D]` float32, contracting w's leading axis.

    w's rows stay contiguous: a contraction over its last axis (`w.T`) made XLA CPU read the
    matrix in a transposed, cache-hostile order (10-30x slower at 1B shapes, measured).
    """
    dt = jnp.promote_types(h.dtype, w.dtype)
    return lax.dot_general(h.astype(dt), w.astype(dt), (((1,), (0,)), ((), ())),
                           preferred_element_type=jnp.float32)


def sparse_down_xla(h, down_t, idx, count, *, dense_above: float = bk.DENSE_ABOVE):
    """A loop over chunks of `bk.CHUNK` active rows, or dense: the same choice as
    `sparse_gate_up_xla` (`bk.use_dense`)."""
    f = down_t.shape[0]
    chunk = bk.CHUNK
    pad = -f % chunk
    h = jnp.pad(jnp.where(jnp.arange(f) < count, h, 0.0), ((0, 0), (0, pad)))
    idx_padded = jnp.pad(idx, (0, pad))

    def chunked(h, w, idx):
        def body(j, acc):
            rows = lax.dynamic_slice_in_dim(idx_padded, j * chunk, chunk)
            w_j, rows = lax.optimization_barrier((w, rows))  # see sparse_gate_up_xla
            return acc + matmul(lax.dynamic_slice_in_dim(h, j * chunk, chunk, axis=1), w_j[rows])

        acc = jnp.zeros((h.shape[0], w.shape[1]), jnp.float32)
        return lax.fori_loop(0, bk.num_chunks(count), body, acc)

    def dense(h, w, idx):
        # Back to natural order; positions >= count hold 0 and all point at row 0, so add, not set.
        h_nat = jnp.zeros((h.shape[0], f), h.dtype).at[:, idx].add(h[:, :f])
        return matmul(h_nat, w)

    out = lax.cond(bk.use_dense(count, f, dense_above), dense, chunked, h, down_t, idx)
    return out.astype(down_t.dtype)


def sparse_down_reference(h, down_t, idx, count):
    """All F rows gathered through idx, positions >= count masked (pure jnp, the truth)."""
    h = jnp.where(jnp.arange(down_t.shape[0]) < count, h, 0.0)
    out = matmul_t(h, down_t[idx].T, precision=lax.Precision.HIGHEST)
    return out.astype(down_t.dtype)


@functools.partial(jax.jit, static_argnames=["backend"])
def sparse_down(h: jnp.ndarray, down_t: jnp.ndarray, idx: jnp.ndarray, count: jnp.ndarray, *,
                backend: str = "auto") -> jnp.ndarray:
    """sum_{k < count} h[:, k] * down_t[idx[k]], accumulated in float32.

    Args:
      h: `[B, F]` float32 in compact order (from `sparse_gate_up`).
      down_t: `[F, D]` W_down transposed, bfloat16 or float32.
      idx: `[F]` int32 active neuron ids in idx[:count] (from `compact`).
      count: `[]` int32 number of active neurons.
      backend: one of `backend.BACKENDS`.

    Returns:
      `[B, D]` in down_t's dtype.
    """
    f, d = down_t.shape
    count = jnp.asarray(count, jnp.int32)
    chex.assert_rank([h, idx, count], [2, 1, 0])
    chex.assert_shape([h, idx], [(None, f), (f,)])
    chex.assert_type([h, idx], [jnp.float32, jnp.int32])
    match bk.resolve(backend):
        case "pallas":
            return sparse_down_pallas(h, down_t, idx, count, interpret=bk.interpret())
        case "xla":
            return sparse_down_xla(h, down_t, idx, count)
        case _:
            return sparse_down_reference(h, down_t, idx, count)
