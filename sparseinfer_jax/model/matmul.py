"""The model's weight matmuls, written so XLA's CPU backend keeps bf16 weights in bf16.

XLA's CPU backend runs a bf16 dot with a single row (every decode step at batch 1) as a float32
matrix-vector product on a float32 copy of the weight matrix, converted on every call. Inside the
decode `while_loop` those converts are loop-invariant, so XLA hoists them out of the loop and the
float32 copies of all weights stay alive for the whole generate (3.3x the weights' bytes, measured
in benchmarks/RESULTS.md). A bf16 dot with two or more rows and a float32 result goes to YNNPACK's
native bf16 kernel instead: no copy, and 10x faster on the 7B MLP shape. So a one-row bf16 input
is padded to two rows; on a memory-bound matvec the extra row costs nothing. float32 keeps the
plain dot (its one-row matvec is the fastest path there), and so does any other backend.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def dot(x: jnp.ndarray, w: jnp.ndarray, contract: int) -> jnp.ndarray:
    """`x: [..., K]` times `w` (`[K, N]` with contract=0, `[N, K]` with contract=1) ->
    `[..., N]` float32."""
    rows = x.reshape(-1, x.shape[-1])
    n = rows.shape[0]
    if n == 1 and w.dtype == jnp.bfloat16 and jax.default_backend() == "cpu":
        rows = jnp.pad(rows, ((0, 1), (0, 0)))
    y = jax.lax.dot_general(
        rows, w, (((1,), (contract,)), ((), ())), preferred_element_type=jnp.float32
    )
    return y[:n].reshape(*x.shape[:-1], y.shape[-1])
