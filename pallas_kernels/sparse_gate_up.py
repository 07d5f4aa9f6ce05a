"""Gated up-projection over the active neurons only: h = act(gate_rows . x) * (up_rows . x).

Input is the compacted active set (`compact.py`): `idx: [F]` int32 neuron ids, the first `count`
of them live, the rest 0 (a valid row, so no gather goes out of bounds). Output `h: [B, F]`
float32 is in that COMPACT order: h[:, k] = act(gate[idx[k]] . x) * (up[idx[k]] . x) for
k < count and exactly 0 for k >= count. Products and sums are float32 whatever the input dtype.

Activations: "relu" = max(z, 0); "fatrelu" = z if z > threshold else 0 (ProSparse's FATReLU,
strict >).

Pallas kernel: one program per block of `block_n` compact positions. A program whose block starts
at or past `count` writes zeros and loads nothing, so the bytes read follow the active count with
no capacity limit. Live programs gather their rows of gate and up through the idx block and walk D
in chunks of `block_d` (a power of 2; the tail chunk is masked). Each row of x (B is small in
decoding) is a separate vector against the same weight tile, so the weights are read once for all
rows and no matmul unit minimum (16 on Triton) applies to B.
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


BLOCK_N = 16


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
    start = pl.program_id(0) * block_n
    ks = start + jnp.arange(block_n)
    count = count_ref[()]
    live = ks < count

    def compute():
        rows = plgpu.load(idx_ref.at[ks], mask=live, other=0)

        def body(j, acc):
            cols = j * block_d + jnp.arange(block_d)
            col_ok = cols < d
            tile = live[:, None] & col_ok[None, :]
            at = (rows[:, None], cols[None, :])
            g = plgpu.load(gate_ref.at[at], mask=tile, other=0).astype(jnp.float32)
            u = plgpu.load(up_ref.at[at], mask=tile, other=0).astype(jnp.float32)
            out = []
            for r in range(b):
                xr = plgpu.load(x_ref.at[r, cols], mask=col_ok, other=0).astype(jnp.float32)
                out.append((acc[r][0] + jnp.sum(g * xr[None, :], axis=1),
                            acc[r][1] + jnp.sum(u * xr[None, :], axis=1)))
            return tuple(out)

        zero = jnp.zeros((block_n,), jnp.float32)
        acc = lax.fori_loop(0, pl.cdiv(d, block_d), body, tuple((zero, zero) for _ in range(b)))
        return tuple(jnp.where(live, activate(gz, activation, threshold) * uz, 0.0)
                     for gz, uz in acc)

    def skip():
        return tuple(jnp.zeros((block_n,), jnp.float32) for _ in range(b))

    h = lax.cond(start < count, compute, skip)
    for r in range(b):
        plgpu.store(h_ref.at[r, ks], h[r], mask=ks < f)


@functools.partial(
    jax.jit,
    static_argnames=["activation", "threshold", "block_n", "block_d", "num_warps", "interpret"])
def sparse_gate_up_pallas(x, gate, up, idx, count, *, activation: str = "relu",
                          threshold: float = 0.0, block_n: int = 16, block_d: int = 256,
                          num_warps: int = 4, interpret: bool = False):
    """Pallas (Triton) `sparse_gate_up`: grid over blocks of `block_n` compact positions."""
    assert block_n & (block_n - 1) == 0 and block_d & (block_d - 1) == 0, "powers of 2 only"
    b, d = x.shape
    f = gate.shape[0]
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
            hj = activate(matmul_t(x, gate[rows]), activation, threshold) * matmul_t(x, up[rows])
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
