"""The per-layer sparse MLP op on TPU: predictor, compaction and the row gathers as Mosaic kernels.

`sparse_mlp_layer_mosaic` has the op's signature and meaning (`layer.sparse_mlp_layer`, less
`backend`): x, the weights, the sign bits and alpha in; the output and the counts (predicted,
computed, fired) out. Its steps:

    kept = tpu_votes(x, sign bits, alpha)          # Mosaic: rows keeping each neuron   [F]
    idx, computed = compact(kept > 0)              # jnp (XLA on TPU)
    a = tpu_gate(x, gate, idx, computed)           # Mosaic: gate rows of the candidates
    rows, fired = compact(any(a != 0)) -> ids      # jnp
    out = tpu_up_down(x, a, up, down_t, rows, fired)   # Mosaic: up and down rows of the fired

Compaction stays in jnp (`contract.compact`: a cumsum and one scatter over F int32). In a
Mosaic kernel it would be the scalar core walking F flags one at a time (11008 at the 7b shape),
after a DMA to bring the vector unit's mask into SMEM; XLA's fused cumsum over 44 KiB is the
simpler of the two, and the kernels then take the ids by scalar prefetch. Unmeasured on a TPU.

Where the kernels run (compiled, or interpreted on the CPU): `common.py`. Reference the tests
compare it against: `pallas_kernels.layer.layer_reference`'s rule, on the jnp references.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels import contract
from pallas_kernels.contract import activate
from pallas_kernels.tpu.common import on_tpu
from pallas_kernels.tpu.gather import tpu_gate, tpu_up_down
from pallas_kernels.tpu.layout import tpu_rows, unpack, weight_dtype, x_parts
from pallas_kernels.tpu.predict import tpu_votes

WEIGHT_DTYPES = (jnp.bfloat16, jnp.float32)

def _row_width(d: int, *weights: jnp.ndarray) -> int:
    """The stored row width of gate, up and down_t: D for `[F, D]` bfloat16 / float32, ceil(D/2)
    for `tpu_rows` pairs (uint32). ValueError for mixed or other dtypes."""
    dtypes = {w.dtype for w in weights}
    if len(dtypes) != 1:
        raise ValueError(f"gate, up and down_t must share a dtype, got {sorted(map(str, dtypes))}.")
    (dtype,) = dtypes
    if dtype == jnp.uint32:
        return -(-d // 2)
    if dtype not in WEIGHT_DTYPES:
        raise ValueError(f"The TPU kernels take bfloat16 or float32 weights, got {dtype}: cast "
                         "them once when loading (TPUs have no float16 arithmetic).")
    return d


def oracle_kept(x: jnp.ndarray, gate: jnp.ndarray, activation: str,
                threshold: float) -> jnp.ndarray:
    """Rows whose true activation act(gate . x) is non-zero, per neuron: `[F]` int32 (the full
    gate, in XLA: the accuracy ceiling, for evaluation)."""
    parts = x_parts(x, gate).astype(jnp.float32)
    z = sum(lax.dot_general(p, w, (((1,), (1,)), ((), ())), precision=lax.Precision.HIGHEST,
                            preferred_element_type=jnp.float32)
            for p, w in zip(parts, unpack(gate, jnp.float32), strict=True))
    return jnp.sum(activate(z, activation, threshold) != 0, axis=0, dtype=jnp.int32)


@functools.partial(jax.jit,
                   static_argnames=["predictor", "activation", "threshold", "union_axis"])
def sparse_mlp_layer_mosaic(x: jnp.ndarray, gate: jnp.ndarray, up: jnp.ndarray,
                            down_t: jnp.ndarray, gate_sign_bits: jnp.ndarray, alpha: jnp.ndarray,
                            *, predictor: str = "sign", activation: str = "relu",
                            threshold: float = 0.0, union_axis=None
                            ) -> tuple[jnp.ndarray, jnp.ndarray]:
    """One decode step's sparse MLP on TPU kernels: predict, gate the candidates, up and down
    the fired.

    Args:
      x: `[B, D]` bfloat16, float16 or float32 MLP input (one token per row).
      gate, up, down_t: `[F, D]` bfloat16 or float32 (down_t is W_down transposed), or the
        same as `layout.tpu_rows` pairs `[F, ceil(D/2)]` uint32, the layout a model should
        keep on TPU: `[F, D]` bfloat16 is re-laid every call (correct, but a full pass over
        each weight).
      gate_sign_bits: `[F, ceil(D/32)]` uint32 packed sign bits of gate (`pack.py`).
      alpha: `[]` float32 conservativeness (data, never static).
      predictor: "sign", "signmag" or "oracle" (the true mask from the full gate).
      activation: "relu" or "fatrelu"; threshold: FATReLU's (static).
      union_axis: None, or a mesh axis name (inside shard_map) over which the candidate set and
        the fired mask are OR-ed, so results do not depend on how the batch is split.

    Returns:
      out: `[B, D]` in down_t's dtype (bfloat16 for pairs), accumulated in float32.
      counts: int32 `[3]`: predicted (the rows' predicted-active neurons, summed over the rows
        and over `union_axis`), computed (neurons whose gate row was read), fired (neurons whose
        up and down rows were read).
    """
    alpha = contract.check_layer_args(
        x, gate, up, down_t, gate_sign_bits, alpha, predictor=predictor, activation=activation,
        row_width=_row_width(x.shape[-1], gate, up, down_t))
    interpret = not on_tpu()
    out_dtype = weight_dtype(down_t)
    gate, up, down_t = tpu_rows(gate), tpu_rows(up), tpu_rows(down_t)
    threshold = float(threshold)

    if predictor == "oracle":
        kept = oracle_kept(x, gate, activation, threshold)
    else:
        kept = tpu_votes(x, gate_sign_bits, alpha, predictor=predictor, interpret=interpret)
    idx, computed = contract.compact(contract.union(kept > 0, union_axis))
    a = tpu_gate(x, gate, idx, computed, activation=activation, threshold=threshold,
                 interpret=interpret)
    a, rows, fired = contract.compact_fired(a, idx, union_axis)
    out = tpu_up_down(x, a, up, down_t, rows, fired, interpret=interpret)
    predicted = contract.total(jnp.sum(kept, dtype=jnp.int32), union_axis)
    counts = contract.counts(predicted, computed, fired)
    return out.astype(out_dtype), counts
