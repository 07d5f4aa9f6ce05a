"""The weight products every path shares: float weights, by the rule of the device programs are
built for, and int8 weights with one float32 scale per stored row.

Float weights (`float_dot`): written so no backend makes a float32 copy of a 16-bit weight.
XLA's CPU backend runs a bf16 dot with a single row (every decode step at batch 1) as a float32
matrix-vector product on a float32 copy of the weight matrix, converted on every call. Inside the
decode `while_loop` those converts are loop-invariant, so XLA hoists them out of the loop and the
float32 copies of all weights stay alive for the whole generate (3.3x the weights' bytes, measured
in benchmarks/RESULTS.md). A bf16 dot with two or more rows and a float32 result goes to YNNPACK's
native bf16 kernel instead: no copy, and 10x faster on the 7B MLP shape. So a one-row bf16 input
is padded to two rows; on a memory-bound matvec the extra row costs nothing. float32 keeps the
plain dot (its one-row matvec is the fastest path there).

XLA's GPU backend does the same below compute capability 8.0 (a T4, whose 16-bit dtype is
float16): a one-row float16 dot with a float32 result becomes a float32 copy of the weight and a
float32 cuBLAS call, while the same dot with a float16 result is one `__cublas$lt$matmul` on the
float16 weight, no copy (compiled for the shipped T4 spec). cuBLAS sums a float16-output gemm in
float32 (XLA's `GetBlasComputationType`: float16 and bf16 outputs compute in kF32), so the float16
result is the float32 sum rounded once; the callers that round the result to the weight's dtype
anyway (attention projections, down) get the same numbers, the others (gate, up, the LM head) one
float16 rounding more, as a float16 model in PyTorch has. So there the dot's result is float16,
widened afterwards, for weights large enough for cuBLAS (`GPU_GEMV_MIN_ELEMS`: a 7b model's every
projection). There too XLA's dot merger concatenated the weights of dots that share their input
(q, k and v; gate and up) inside the decode loop, a copy every step: each float16 dot passes its
rows and weight through an optimization barrier of their own, so no two share an input. On any
GPU a one-row dot too small for cuBLAS or Triton that contracts the weight's leading axis (down)
is padded to two rows, as on the CPU: as a multiply-and-reduce it wrote the whole float32 product.
Other dots on GPUs (Triton GEMMs, no copy) and TPUs stay plain.

Which device decides is the one programs are built for (`pallas_kernels.backend.target`), so a GPU
compiled offline on a CPU machine gets the GPU's rule. The sparse paths' dense branches and
gathered rows go through the same rule (`matmul_t`, `matmul`, `gathered_t`, `gathered`), the
small operand cast to the weight's 16-bit dtype first (as the model's dense down projection
does), so none of them widens a weight either.

int8 weights. A weight `w: [R, C]` is stored as `q: [R, C]` int8 and `scale: [R]` float32 with
`w[r] ~= q[r] * scale[r]`, `q = round(w / scale)`, `scale = max|w[r]| / 127` (1.0 for an all-zero
row, whose q is all 0). A row is what a sparse path reads: a neuron's `gate`, `up` or `down_t`
row reads its scale with it. The scale is applied to the small side of each product, never to a
weight-sized array:

    y = x @ w.T  ->  (x @ q.T) * scale          (`dot`, contract=1: the rows are outputs)
    y = h @ w    ->  (h * scale) @ q            (`dot`, contract=0: the rows are inputs, down_t)

Sums are float32. XLA's CPU backend has no dot that reads int8 and accumulates in float32: given
`x @ q.astype(f32).T` it converts the whole weight to float32 (and, inside a decode loop, hoists
that loop-invariant convert out of the loop, keeping a float32 copy of every weight alive), and an
int8 x int8 dot needs the activations quantised too. `dot` therefore converts `BLOCK_BYTES` of
rows at a time inside a loop (the block stays in cache until its dot reads it); the weight goes
through an `optimization_barrier` with the loop index, so no convert is loop-invariant. Other
backends fuse the convert into the dot's operand read, so there it is one plain dot.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from pallas_kernels import backend as bk

SCHEMES = ("int8",)
QMAX = 127
# The scale is max|w| times this (not divided by QMAX: XLA turns a division by a constant into
# this product, so numpy and jnp give the same scales).
STEP = np.float32(1 / QMAX)
# float32 bytes of one converted block on the CPU (fits L2 beside the block's int8 rows):
# 512 rows of a 1b MLP row (2048 wide) measured as fast as 256 or 1408 (benchmarks/RESULTS.md).
BLOCK_BYTES = 4 * 2**20

# Below this compute capability XLA's GPU backend widens a one-row float16 dot's weight to float32.
GPU_NATIVE_MIXED_CC = (8, 0)
# XLA's GPU backend sends a vector-matrix dot to cuBLAS from this many operand elements on
# (`IsMatrixMultiplicationTooSmallForRewriting(dot, 10000000)` in its algebraic simplifier); a
# smaller one becomes a multiply-and-reduce fusion that reads float16 as it is with a float32
# result, and with a float16 one materialised the products of a `[1024, 256]` down projection.
GPU_GEMV_MIN_ELEMS = 10_000_000
# Such a fusion over a `[K, N]` weight contracted on K (down) wrote the whole float32 product
# `[K, N]` before reducing it (a 1024 x 256 down, at the tiny shape, on the H100 and T4 specs), so
# a one-row input is padded to two there: a matrix product, no reduction.


def float_dot(x: jnp.ndarray, w: jnp.ndarray, contract: int) -> jnp.ndarray:
    """`x: [..., K]` times the float weight `w` (`[K, N]` with contract=0, `[N, K]` with
    contract=1) -> `[..., N]` float32, written for the device programs are built for (module
    docstring: no float32 copy of a 16-bit weight on the CPU or a pre-Ampere GPU)."""
    rows = x.reshape(-1, x.shape[-1])
    n = rows.shape[0]
    device = bk.target()
    cc = device.compute_capability if device.platform == "cuda" else None
    out = jnp.float32
    if n == 1 and ((w.dtype == jnp.bfloat16 and device.platform == "cpu") or (
            device.platform in ("cuda", "gpu") and contract == 0 and w.size < GPU_GEMV_MIN_ELEMS)):
        rows = jnp.pad(rows, ((0, 1), (0, 0)))
    if cc is not None and cc < GPU_NATIVE_MIXED_CC and w.dtype == x.dtype == jnp.float16:
        # Each weight with its own copy of the rows: else XLA's dot merger concatenates the
        # weights of dots that share an input (q, k and v: 96 MiB at 7b; gate and up) inside
        # the loop, every step.
        rows, w = jax.lax.optimization_barrier((rows, w))
        if n == 1 and w.size >= GPU_GEMV_MIN_ELEMS:
            out = jnp.float16
    y = jax.lax.dot_general(
        rows, w, (((1,), (contract,)), ((), ())), preferred_element_type=out
    ).astype(jnp.float32)
    return y[:n].reshape(*x.shape[:-1], y.shape[-1])


def quantize_rows_numpy(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`w: [R, C]` float -> (`q: [R, C]` int8, `scale: [R]` float32), computed in float32 a few
    rows at a time (no float32 copy of a 16-bit weight)."""
    assert w.ndim == 2, w.shape
    q = np.empty(w.shape, np.int8)
    scale = np.empty(w.shape[0], np.float32)
    step = max(1, 2**22 // max(1, w.shape[1]))
    for r in range(0, w.shape[0], step):
        block = np.asarray(w[r:r + step], np.float32)
        top = np.max(np.abs(block), axis=1)
        s = np.where(top > 0, top * STEP, np.float32(1.0)).astype(np.float32)
        q[r:r + step] = np.clip(np.rint(block / s[:, None]), -QMAX, QMAX).astype(np.int8)
        scale[r:r + step] = s
    return q, scale


def quantize_rows(w: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """`quantize_rows_numpy` in jnp (for random models and tests)."""
    w = w.astype(jnp.float32)
    top = jnp.max(jnp.abs(w), axis=1)
    scale = jnp.where(top > 0, top * STEP, 1.0)
    q = jnp.clip(jnp.round(w / scale[:, None]), -QMAX, QMAX).astype(jnp.int8)
    return q, scale


def dequantize(q: jnp.ndarray, scale: jnp.ndarray) -> jnp.ndarray:
    """`q * scale[:, None]` in float32: the weight the int8 products stand for (references and
    tests only; no fast path calls it)."""
    return q.astype(jnp.float32) * scale[:, None]


def _block_rows(rows: int, cols: int) -> int:
    return max(1, min(rows, BLOCK_BYTES // (4 * max(1, cols))))


def _dot(x: jnp.ndarray, w: jnp.ndarray, contract: int) -> jnp.ndarray:
    """`x` times `w` contracting x's last axis with w's axis `contract`, float32 sums: a 16-bit
    float weight with x cast to its dtype, by `float_dot`'s rule; an int8 one converted whole (a
    gathered chunk, or a block of `_blocked`)."""
    if w.dtype == jnp.int8:
        w = w.astype(jnp.float32)
    if w.dtype in (jnp.bfloat16, jnp.float16):
        x = x.astype(w.dtype)
    elif x.dtype != w.dtype:
        x = x.astype(jnp.promote_types(x.dtype, w.dtype))
    return float_dot(x, w, contract)


def _blocked(x: jnp.ndarray, q: jnp.ndarray, contract: int) -> jnp.ndarray:
    """`x: [N, K]` times int8 `q` (`[M, K]` with contract=1, `[K, M]` with contract=0) ->
    `[N, M]` float32, converting a block of q's rows at a time (module docstring)."""
    rows, cols = q.shape
    rb = _block_rows(rows, cols)
    n_full, tail = divmod(rows, rb)
    n = x.shape[0]

    def block(start, size, q, x):
        qb = lax.dynamic_slice_in_dim(q, start, size).astype(jnp.float32)
        if contract == 1:
            return _dot(x, qb, 1)
        return _dot(lax.dynamic_slice_in_dim(x, start, size, axis=1), qb, 0)

    if contract == 1:
        def body(j, acc):
            qj, j = lax.optimization_barrier((q, j))
            return lax.dynamic_update_slice_in_dim(acc, block(j * rb, rb, qj, x), j * rb, axis=1)

        out = lax.fori_loop(0, n_full, body, jnp.zeros((n, rows), jnp.float32))
        if tail:
            qt, xt = lax.optimization_barrier((q, x))
            out = lax.dynamic_update_slice_in_dim(out, block(n_full * rb, tail, qt, xt),
                                                  n_full * rb, axis=1)
        return out

    def body(j, acc):
        qj, j = lax.optimization_barrier((q, j))
        return acc + block(j * rb, rb, qj, x)

    out = lax.fori_loop(0, n_full, body, jnp.zeros((n, cols), jnp.float32))
    if tail:
        qt, xt = lax.optimization_barrier((q, x))
        out = out + block(n_full * rb, tail, qt, xt)
    return out


def dot(x: jnp.ndarray, q: jnp.ndarray, scale: jnp.ndarray, contract: int) -> jnp.ndarray:
    """`x: [N, K]` times the int8 weight `q` with per-row `scale` -> `[N, M]` float32.

    contract=1: `q: [M, K]`, scale `[M]` (the rows are outputs: q, k, v, o, gate, up, LM head);
    contract=0: `q: [K, M]`, scale `[K]` (the rows are inputs: down_t). Never a dequantised copy
    of q: on the CPU a block of rows at a time (`_blocked`), elsewhere a dot XLA fuses the
    convert into.
    """
    if contract == 0:
        x = x * scale.astype(jnp.float32)
    if bk.target().platform == "cpu":
        y = _blocked(x, q, contract)
    else:
        y = _dot(x, q, contract)
    return y * scale if contract == 1 else y


def matmul_t(x: jnp.ndarray, w: jnp.ndarray, scale: jnp.ndarray | None) -> jnp.ndarray:
    """`x: [B, D]` times every row of `w: [F, D]` -> `[B, F]` float32 (the int8 `dot` when `scale`
    is given)."""
    return _dot(x, w, 1) if scale is None else dot(x, w, scale, 1)


def matmul(h: jnp.ndarray, w: jnp.ndarray, scale: jnp.ndarray | None) -> jnp.ndarray:
    """`h: [B, F]` float32 times `w: [F, D]` -> `[B, D]` float32 (the int8 `dot` when `scale` is
    given)."""
    return _dot(h, w, 0) if scale is None else dot(h, w, scale, 0)


def gathered_t(x: jnp.ndarray, w: jnp.ndarray, scale: jnp.ndarray | None,
           rows: jnp.ndarray) -> jnp.ndarray:
    """`x: [B, D]` times the gathered rows `w[rows]` transposed -> `[B, len(rows)]` float32 (int8
    rows converted after the gather, each column times its row's scale)."""
    y = _dot(x, w[rows], 1)
    return y if scale is None else y * scale[rows]


def gathered(h: jnp.ndarray, w: jnp.ndarray, scale: jnp.ndarray | None,
         rows: jnp.ndarray) -> jnp.ndarray:
    """`h: [B, len(rows)]` float32 times the gathered rows `w[rows]` -> `[B, D]` float32 (int8 rows
    converted after the gather, h's columns times their rows' scales)."""
    return _dot(h if scale is None else h * scale[rows], w[rows], 0)
