"""Gated up-projection over the active neurons only: h = act(gate_rows . x) * (up_rows . x).

Input is the compacted active set (`compact.py`): `idx: [F]` int32 neuron ids, the first `count`
of them live, the rest 0 (a valid row, so no gather goes out of bounds). Output `h: [B, F]`
float32 is in that COMPACT order: h[:, k] = act(gate[idx[k]] . x) * (up[idx[k]] . x) for
k < count and exactly 0 for k >= count. Products and sums are float32 whatever the input dtype.

Activations: "relu" = max(z, 0); "fatrelu" = z if z > threshold else 0 (ProSparse's FATReLU,
strict >).

Pallas kernel: one program per block of `block_n` (1) compact positions over the whole D, so
at 10% active a 7b layer (F = 11008) has 1101 programs with work: 8.3 per SM of an H100, 5.9 on
the 188 SMs of an RTX PRO 6000, the most SMs of the GPUs the compile report knows; a program
whose block starts at or past `count` writes zeros and loads nothing, so the bytes read follow
the active count with no capacity limit. The batch is a tile axis (padded to a power of 2), so the
registers grow with B * block_d, not with unrolled per-row code. Two stages per block: the gate
rows over D first, then the up rows only for the neurons that fired (act(gate) != 0 for some
batch row): a row that fired for no row loads no up bytes, a block with none skips the up loop.
h is exactly what the one-stage formula gives (act(g) * u is 0 where act(g) is 0).
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

ACTIVATIONS = ("relu", "fatrelu")


def activate(z: jnp.ndarray, activation: str, threshold: float) -> jnp.ndarray:
    """The ReLU-family activation on float32 pre-activations."""
    if activation == "fatrelu":
        return jnp.where(z > threshold, z, 0.0)
    return jnp.maximum(z, 0.0)


def matmul_t(x: jnp.ndarray, w: jnp.ndarray, precision=None) -> jnp.ndarray:
    """`x: [B, D]` times `w: [K, D]` transposed -> `[B, K]` float32 (mixed dtypes promoted)."""
    dt = jnp.promote_types(x.dtype, w.dtype)
    return lax.dot_general(x.astype(dt), w.astype(dt), (((1,), (1,)), ((), ())),
                           precision=precision, preferred_element_type=jnp.float32)


BLOCK_N = 1
# x's tile is [B padded, block_d]: block_d = max(MIN_BLOCK_D, TILE // B padded) keeps it (and the
# registers holding it) the same size at every batch.
TILE = 4096
MIN_BLOCK_D = 128
# On the H200 (2026-11-29, benchmarks/gpu_variants.py, 10% of a 7b layer, batch 1) one position a
# program read at 1548 GB/s with 2 warps, 1179 with 4.
NUM_WARPS = 2


def num_live_programs(count: int, d: int, *, block_n: int = BLOCK_N) -> int:
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
                          threshold: float = 0.0, block_n: int = BLOCK_N,
                          block_d: int | None = None, num_warps: int = NUM_WARPS,
                          interpret: bool = False):
    """Pallas (Triton) `sparse_gate_up`: grid over blocks of `block_n` compact positions.

    `block_d` (a power of 2) defaults to max(MIN_BLOCK_D, TILE // B padded), at most D padded.
    """
    b, d = x.shape
    f = gate.shape[0]
    if block_d is None:
        block_d = max(MIN_BLOCK_D, TILE // pl.next_power_of_2(b))
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


def sparse_gate_up_xla(x, gate, up, idx, count, *, activation: str, threshold: float,
                       dense_above: float = bk.DENSE_ABOVE):
    """A loop over chunks of `bk.CHUNK` active rows (trip count from `count`), or dense above
    `dense_above * F` active neurons (`bk.use_dense`)."""
    b = x.shape[0]
    f = gate.shape[0]
    chunk = bk.CHUNK
    # Pad with row 0 so every chunk's slice is in bounds; padded positions are masked to 0.
    idx_padded = jnp.pad(idx, (0, -f % chunk))

    def chunked(x, gate, up, idx, count):
        def body(j, h):
            start = j * chunk
            rows = lax.dynamic_slice_in_dim(idx_padded, start, chunk)
            # Tied to the rows, the weights are loop-variant: XLA CPU gathers bf16 from a float32
            # copy of the whole matrix, which it would otherwise hoist out of the loop.
            g, u, rows = lax.optimization_barrier((gate, up, rows))
            hj = activate(matmul_t(x, g[rows]), activation, threshold) * matmul_t(x, u[rows])
            hj = jnp.where(start + jnp.arange(chunk) < count, hj, 0.0)
            return lax.dynamic_update_slice_in_dim(h, hj, start, axis=1)

        h = jnp.zeros((b, f + (-f % chunk)), jnp.float32)
        return lax.fori_loop(0, bk.num_chunks(count), body, h)[:, :f]

    def dense(x, gate, up, idx, count):
        h = activate(matmul_t(x, gate), activation, threshold) * matmul_t(x, up)
        return jnp.where(jnp.arange(f) < count, jnp.take(h, idx, axis=1), 0.0)

    return lax.cond(bk.use_dense(count, f, dense_above), dense, chunked, x, gate, up, idx, count)


def sparse_gate_up_reference(x, gate, up, idx, count, *, activation: str, threshold: float):
    """All F rows gathered through idx, positions >= count masked to 0 (pure jnp, the truth)."""
    hp = lax.Precision.HIGHEST
    g = matmul_t(x, gate[idx], precision=hp)
    h = activate(g, activation, threshold) * matmul_t(x, up[idx], precision=hp)
    return jnp.where(jnp.arange(gate.shape[0]) < count, h, 0.0)


@functools.partial(jax.jit, static_argnames=["activation", "threshold", "backend"])
def sparse_gate_up(x: jnp.ndarray, gate: jnp.ndarray, up: jnp.ndarray, idx: jnp.ndarray,
                   count: jnp.ndarray, *, activation: str = "relu", threshold: float = 0.0,
                   backend: str = "auto") -> jnp.ndarray:
    """act(gate[idx[k]] . x) * (up[idx[k]] . x) for the first `count` compact positions.

    Args:
      x: `[B, D]` bfloat16 or float32 MLP input.
      gate, up: `[F, D]` weights (one row per neuron).
      idx: `[F]` int32 active neuron ids in idx[:count], 0 after (from `compact`).
      count: `[]` int32 number of active neurons.
      activation: "relu" or "fatrelu" (static).
      threshold: FATReLU threshold (static; ignored by "relu").
      backend: one of `backend.BACKENDS`.

    Returns:
      `[B, F]` float32 in compact order, exactly 0 at positions >= count.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"Sparse MLP activation {activation!r} is not ReLU-family: use one of "
                         f"{', '.join(ACTIVATIONS)}.")
    f, d = gate.shape
    count = jnp.asarray(count, jnp.int32)
    chex.assert_rank([x, idx, count], [2, 1, 0])
    chex.assert_shape([x, up, idx], [(None, d), (f, d), (f,)])
    chex.assert_type(idx, jnp.int32)
    threshold = float(threshold)
    match bk.resolve(backend):
        case "pallas":
            return sparse_gate_up_pallas(x, gate, up, idx, count, activation=activation,
                                         threshold=threshold, interpret=bk.interpret())
        case "xla":
            return sparse_gate_up_xla(x, gate, up, idx, count, activation=activation,
                                      threshold=threshold)
        case _:
            return sparse_gate_up_reference(x, gate, up, idx, count, activation=activation,
                                            threshold=threshold)
