"""Down projection over the active neurons only: out = sum_{k < count} h[:, k] * down_t[idx[k]].

`h: [B, F]` float32 comes from `sparse_gate_up` in compact order; `down_t: [F, D]` is W_down
transposed, so each neuron's down column is a contiguous row. Products and sums are float32; the
result is cast to down_t's dtype.

Pallas kernel: grid (D blocks of `block_d`) x (`num_splits` splits of the live prefix). The live
positions [0, count) are cut into `num_splits` equal runs of whole `block_n` blocks, so every
split has work whatever the count; each program sums its run for its columns into a float32
partial `[num_splits, B, D]`, and one jnp sum reduces the splits (deterministic, unlike atomics).
A program whose run is empty loads nothing and writes zeros; bytes read follow the count.
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import backend as bk
from pallas_kernels.sparse_gate_up import matmul_t


def _cdiv(a, b: int):
    """Ceiling division of a non-negative traced int by a static int (plain lax.div)."""
    return lax.div(a + (b - 1), b)


BLOCK_N = 32
BLOCK_D = 128
NUM_SPLITS = 8


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
    b = h_ref.shape[0]
    d = w_ref.shape[1]
    cols = pl.program_id(0) * block_d + jnp.arange(block_d)
    col_ok = cols < d
    s = pl.program_id(1)
    count = count_ref[()]
    run = _cdiv(_cdiv(count, block_n), num_splits) * block_n
    start = s * run
    num_blocks = _cdiv(jnp.clip(count - start, 0, run), block_n)

    def body(j, acc):
        ks = start + j * block_n + jnp.arange(block_n)
        live = ks < count
        rows = plgpu.load(idx_ref.at[ks], mask=live, other=0)
        w = plgpu.load(w_ref.at[rows[:, None], cols[None, :]],
                       mask=live[:, None] & col_ok[None, :], other=0).astype(jnp.float32)
        out = []
        for r in range(b):
            hr = plgpu.load(h_ref.at[r, ks], mask=live, other=0.0)
            out.append(acc[r] + jnp.sum(hr[:, None] * w, axis=0))
        return tuple(out)

    init = tuple(jnp.zeros((block_d,), jnp.float32) for _ in range(b))
    acc = lax.fori_loop(0, num_blocks, body, init)
    for r in range(b):
        plgpu.store(out_ref.at[s, r, cols], acc[r], mask=col_ok)


@functools.partial(
    jax.jit, static_argnames=["block_n", "block_d", "num_splits", "num_warps", "interpret"])
def sparse_down_pallas(h, down_t, idx, count, *, block_n: int = 32, block_d: int = 128,
                       num_splits: int = 8, num_warps: int = 4, interpret: bool = False):
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
            return acc + matmul(lax.dynamic_slice_in_dim(h, j * chunk, chunk, axis=1), w[rows])

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
