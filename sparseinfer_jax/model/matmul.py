"""The model's weight matmuls, written so no backend makes a float32 copy of a 16-bit weight.

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
compiled offline on a CPU machine gets the GPU's rule.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels import backend as bk

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


def dot(x: jnp.ndarray, w: jnp.ndarray, contract: int) -> jnp.ndarray:
    """`x: [..., K]` times `w` (`[K, N]` with contract=0, `[N, K]` with contract=1) ->
    `[..., N]` float32."""
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
