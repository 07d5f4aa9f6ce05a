"""The older GPU chain, kept as the comparison the two-kernel path must beat.

`chain_mlp` is what the H200 timed (2026-11-29, `benchmarks/RESULTS.md`): the predictor's kernel,
an XLA compaction into an id list, then two Triton kernels over that list, `sparse_gate_up`
(h = act(gate_rows . x) * (up_rows . x) in compact order) and `sparse_down` (out = sum over live
positions of h[:, k] * down_t[idx[k]]). The model runs `gpu/layer.py` instead (no id list, no
compaction between kernels); `benchmarks/gpu_variants.py` times both, and the compile report
compiles both, until a GPU has timed the two-kernel path. Each kernel's reference is beside it.

`sparse_gate_up`: one program per block of `block_n` (1) compact positions over the whole D, so at
10% active a 7b layer (F = 11008) has 1101 programs with work: 8.3 per SM of an H100. A program
whose block starts at or past `count` writes zeros and loads nothing. The batch is a tile axis
(padded to a power of 2). Two stages per block: the gate rows over D first, then the up rows only
for the neurons that fired (act(gate) != 0 for some batch row).

`sparse_down`: grid (D blocks of `block_d`) x (`num_splits` splits of the live prefix); each
program sums its run for its columns into a float32 partial `[num_splits, B, D]`, and one jnp sum
reduces the splits (deterministic, unlike atomics). A row is read only if h[:, k] is non-zero for
some batch row. Each row load is block_d (64) bf16 columns, 128 bytes: one full cache line.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.backend import plgpu
from pallas_kernels.contract import activate, matmul_t

GATE_UP_BLOCK_N = 1
# x's tile is [B padded, block_d]: block_d = max(GATE_UP_MIN_BLOCK_D, GATE_UP_TILE // B padded)
# keeps it (and the
# registers holding it) the same size at every batch.
GATE_UP_TILE = 4096
GATE_UP_MIN_BLOCK_D = 128
# On the H200 (2026-11-29, benchmarks/gpu_variants.py, 10% of a 7b layer, batch 1) one position a
# program read at 1548 GB/s with 2 warps, 1179 with 4.
GATE_UP_NUM_WARPS = 2


def gate_up_live_programs(count: int, d: int, *, block_n: int = GATE_UP_BLOCK_N) -> int:
    """Programs of `sparse_gate_up_pallas` that load weights when `count` neurons are active."""
    return pl.cdiv(count, block_n)


def sparse_gate_up_kernel(x_ref, gate_ref, up_ref, idx_ref, count_ref, h_ref, *,
                          block_n: int, block_d: int, activation: str, threshold: float):
    """One program: compact positions [i * block_n, (i + 1) * block_n).

    Refs (whole arrays): x_ref `[B, D]`; gate_ref, up_ref `[F, D]`; idx_ref `[F]` int32;
    count_ref `[]` int32. Output h_ref `[B, F]` float32.
    """
    b, d = x_ref.shape
    f = h_ref.shape[1]
    bs = jnp.arange(pl.next_power_of_2(b))
    b_ok = bs < b
    start = pl.program_id(0) * block_n
    count = count_ref[()]
    ks = [start + i for i in range(block_n)]
    live = [k < count for k in ks]
    rows = [jnp.where(ok, idx_ref[jnp.minimum(k, f - 1)], 0)
            for k, ok in zip(ks, live, strict=True)]
    num_chunks = pl.cdiv(d, block_d)

    def matvecs(w_ref, loads):
        """Per position i: x . w_ref[rows[i]] `[B padded]` float32, row i read where loads[i]."""
        def body(j, acc):
            cols = j * block_d + jnp.arange(block_d)
            col_ok = cols < d
            x = plgpu.load(x_ref.at[bs[:, None], cols[None, :]], mask=b_ok[:, None] & col_ok[None],
                           other=0).astype(jnp.float32)
            out = []
            for i in range(block_n):
                w = plgpu.load(w_ref.at[rows[i], cols], mask=col_ok & loads[i], other=0)
                out.append(acc[i] + jnp.sum(x * w.astype(jnp.float32)[None, :], axis=1))
            return tuple(out)

        zero = jnp.zeros(bs.shape, jnp.float32)
        trips = num_chunks * functools.reduce(jnp.logical_or, loads).astype(jnp.int32)
        return lax.fori_loop(jnp.int32(0), trips, body, tuple(zero for _ in range(block_n)))

    gates = [jnp.where(b_ok, activate(g, activation, threshold), 0.0)
             for g in matvecs(gate_ref, live)]
    # A sum, not jnp.any: Pallas Triton has no reduce_or.
    fired = [ok & (jnp.sum((g != 0).astype(jnp.int32)) > 0)
             for g, ok in zip(gates, live, strict=True)]
    ups = matvecs(up_ref, fired)
    for i in range(block_n):
        plgpu.store(h_ref.at[bs, ks[i]], jnp.where(fired[i], gates[i] * ups[i], 0.0),
                    mask=b_ok & (ks[i] < f))


@functools.partial(
    jax.jit,
    static_argnames=["activation", "threshold", "block_n", "block_d", "num_warps", "interpret"])
def sparse_gate_up_pallas(x, gate, up, idx, count, *, activation: str = "relu",
                          threshold: float = 0.0, block_n: int = GATE_UP_BLOCK_N,
                          block_d: int | None = None, num_warps: int = GATE_UP_NUM_WARPS,
                          interpret: bool = False):
    """Pallas (Triton) `sparse_gate_up`: grid over blocks of `block_n` compact positions.

    `block_d` (a power of 2) defaults to max(GATE_UP_MIN_BLOCK_D, GATE_UP_TILE // B padded), at
    most D padded.
    """
    b, d = x.shape
    f = gate.shape[0]
    if block_d is None:
        block_d = max(GATE_UP_MIN_BLOCK_D, GATE_UP_TILE // pl.next_power_of_2(b))
    assert block_d & (block_d - 1) == 0, "block_d: a power of 2"
    block_d = min(block_d, pl.next_power_of_2(d))
    kernel = functools.partial(sparse_gate_up_kernel, block_n=block_n, block_d=block_d,
                               activation=activation, threshold=threshold)
    return pl.pallas_call(
        kernel,
        grid=(pl.cdiv(f, block_n),),
        out_shape=jax.ShapeDtypeStruct((b, f), jnp.float32),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps),
        interpret=interpret,
        name="sparse_gate_up",
    )(x, gate, up, idx, count)


def sparse_gate_up_reference(x, gate, up, idx, count, *, activation: str, threshold: float):
    """All F rows gathered through idx, positions >= count masked to 0 (pure jnp, the truth)."""
    hp = lax.Precision.HIGHEST
    g = matmul_t(x, gate[idx], precision=hp)
    h = activate(g, activation, threshold) * matmul_t(x, up[idx], precision=hp)
    return jnp.where(jnp.arange(gate.shape[0]) < count, h, 0.0)


def _cdiv(a, b: int):
    """Ceiling division of a non-negative traced int by a static int (plain lax.div)."""
    return lax.div(a + (b - 1), b)


DOWN_BLOCK_N = 16
DOWN_BLOCK_D = 64
DOWN_NUM_SPLITS = 24
# 2 warps for 64 columns: on the H200 (2026-11-29, benchmarks/gpu_variants.py, 10% of a 7b layer)
# 20.4 us against 25.5 with 4 warps.
DOWN_NUM_WARPS = 2


def down_live_programs(count: int, d: int, *, block_n: int = DOWN_BLOCK_N,
                       block_d: int = DOWN_BLOCK_D,
                      num_splits: int = DOWN_NUM_SPLITS) -> int:
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
def sparse_down_pallas(h, down_t, idx, count, *, block_n: int = DOWN_BLOCK_N,
                       block_d: int = DOWN_BLOCK_D,
                       num_splits: int = DOWN_NUM_SPLITS, num_warps: int = DOWN_NUM_WARPS,
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


def sparse_down_reference(h, down_t, idx, count):
    """All F rows gathered through idx, positions >= count masked (pure jnp, the truth)."""
    h = jnp.where(jnp.arange(down_t.shape[0]) < count, h, 0.0)
    out = matmul_t(h, down_t[idx].T, precision=lax.Precision.HIGHEST)
    return out.astype(down_t.dtype)


@functools.partial(jax.jit, static_argnames=["activation", "threshold", "interpret"])
def chain_mlp(x, gate, up, down_t, idx, count, *, activation: str = "relu",
              threshold: float = 0.0, interpret: bool = False):
    """`sparse_gate_up` then `sparse_down` over the candidates `idx[:count]` (from
    `contract.compact`): (out `[B, D]` in down_t's dtype, fired `[F]` bool from h != 0)."""
    h = sparse_gate_up_pallas(x, gate, up, idx, count, activation=activation,
                              threshold=float(threshold), interpret=interpret)
    out = sparse_down_pallas(h, down_t, idx, count, interpret=interpret)
    return out, jnp.any(h != 0, axis=0)
