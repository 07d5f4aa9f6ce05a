"""The TPU kernels' weight layout, made once where the model keeps the weights, and the dense
products that read it as it is.

Row layout (`tpu_rows`). XLA stores a 16-bit `[F, D]` array in HBM with two neighbouring ROWS
packed in each 32-bit word (tiles `(8, 128)(2, 1)`), and Mosaic refuses to copy one row of such
a pair: a bf16 neuron row cannot be fetched alone. The kernels therefore take bfloat16 weights
as `[F, ceil(D/2)]` uint32, each word holding two neighbouring COLUMNS of the same row (low half
the even column): made once per weight, where the model keeps it. In VMEM the halves become two
float32 arrays by a shift and a mask (a bf16 value is the top half of its float32), so x is
split the same way: even columns against even, odd against odd. float32 weights are taken as
they are. Passing `[F, D]` bfloat16 to the op is correct but re-lays the whole weight every
call, so a model that runs on the TPU kernels holds its MLP weights as `tpu_rows`
(`sparseinfer_jax.model.layout`).

Dense mode reads the same pairs (`rows_matmul_t`, `rows_matmul`): each word's halves become two
bfloat16 operands by a shift and a mask that XLA fuses into the products, so a dense step reads
each weight once and copies none (compiled for a v5e at the 7b shape, batch 1: 90.6 MB accessed
for a gate matvec on pairs against 90.4 MB on `[F, D]` bfloat16, and no weight-sized op).
`from_tpu_rows` undoes the layout, for a path that cannot read it.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

_HIGH = 0xFFFF0000


def tpu_rows(w: jnp.ndarray) -> jnp.ndarray:
    """`w: [F, D]` as the kernels gather it: float32 as is, bfloat16 as `[F, ceil(D/2)]` uint32
    column pairs (see the module docstring). Already-packed uint32 passes through."""
    if w.dtype in (jnp.float32, jnp.uint32):
        return w
    assert w.dtype == jnp.bfloat16, w.dtype
    f, d = w.shape
    pairs = jnp.pad(w, ((0, 0), (0, d % 2))).reshape(f, -1, 2)
    return lax.bitcast_convert_type(pairs, jnp.uint32)


def weight_dtype(rows: jnp.ndarray):
    """The dtype the weight rows hold: bfloat16 for packed pairs."""
    return jnp.bfloat16 if rows.dtype == jnp.uint32 else rows.dtype


def x_parts(x: jnp.ndarray, rows: jnp.ndarray) -> jnp.ndarray:
    """`x: [B, D]` split as the rows are: `[1, B, D]` for float32 rows, `[2, B, ceil(D/2)]` (even
    then odd columns, zero-padded) for pairs; bfloat16 if x and the weights both are, else
    float32 (the MXU multiplies bf16 natively; other mixes run in float32)."""
    dt = jnp.bfloat16 if x.dtype == jnp.bfloat16 and rows.dtype == jnp.uint32 else jnp.float32
    x = x.astype(dt)
    if rows.dtype != jnp.uint32:
        return x[None]
    x = jnp.pad(x, ((0, 0), (0, x.shape[1] % 2)))
    return jnp.stack([x[:, 0::2], x[:, 1::2]])


def unpack(rows: jnp.ndarray, dtype) -> list[jnp.ndarray]:
    """VMEM rows `[n, N]` -> the parts x_parts pairs them with, in `dtype` (exact)."""
    if rows.dtype != jnp.uint32:
        return [rows.astype(dtype)]
    as_f32 = lambda a: lax.bitcast_convert_type(a, jnp.float32).astype(dtype)  # noqa: E731
    return [as_f32(rows << 16), as_f32(rows & jnp.uint32(_HIGH))]


def from_tpu_rows(rows: jnp.ndarray, d: int) -> jnp.ndarray:
    """`tpu_rows(w)` back to `w: [F, d]` bfloat16 (exact); anything else as it is."""
    if rows.dtype != jnp.uint32:
        return rows
    halves = lax.bitcast_convert_type(rows, jnp.bfloat16)  # [F, N, 2], the even column first
    return halves.reshape(rows.shape[0], -1)[:, :d]


def _product(a, b, contract: int) -> jnp.ndarray:
    return lax.dot_general(a, b, (((1,), (contract,)), ((), ())),
                           preferred_element_type=jnp.float32)


def rows_matmul_t(x: jnp.ndarray, rows: jnp.ndarray) -> jnp.ndarray:
    """`x: [B, D]` times the weight `rows` holds (`[F, D]` or its pairs), transposed -> `[B, F]`
    float32: the even columns against the even, the odd against the odd."""
    parts = x_parts(x, rows)
    return sum(_product(p, w, 1) for p, w in zip(parts, unpack(rows, parts.dtype), strict=True))


def rows_matmul(h: jnp.ndarray, rows: jnp.ndarray, d: int) -> jnp.ndarray:
    """`h: [B, F]` times the weight `rows` holds (`[F, d]` or its pairs) -> `[B, d]` float32."""
    dt = jnp.bfloat16 if rows.dtype == jnp.uint32 else jnp.promote_types(h.dtype, rows.dtype)
    outs = [_product(h.astype(dt), w, 0) for w in unpack(rows, dt)]
    return jnp.stack(outs, axis=-1).reshape(h.shape[0], -1)[:, :d]
