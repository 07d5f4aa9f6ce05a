"""The per-layer sparse MLP op on TPU: predictor, compaction and the row gathers as Mosaic kernels.

`sparse_mlp_layer_mosaic` has the op's signature and meaning (the per-layer op of issue 20, less
`backend`): x, the weights, the sign bits and alpha in; the output and the counts (predicted,
computed, fired) out. Its steps:

    kept = tpu_votes(x, sign bits, alpha)          # Mosaic: rows keeping each neuron   [F]
    idx, computed = compact(kept > 0)              # jnp (XLA on TPU)
    a = tpu_gate(x, gate, idx, computed)           # Mosaic: gate rows of the candidates
    rows, fired = compact(any(a != 0)) -> ids      # jnp
    out = tpu_up_down(x, a, up, down_t, rows, fired)   # Mosaic: up and down rows of the fired

Compaction stays in jnp (`compact.compact_xla`: a cumsum and one scatter over F int32). In a
Mosaic kernel it would be the scalar core walking F flags one at a time (11008 at the 7b shape),
after a DMA to bring the vector unit's mask into SMEM; XLA's fused cumsum over 44 KiB is the
simpler of the two, and the kernels then take the ids by scalar prefetch. Unmeasured on a TPU.

Where the kernels run (compiled, or interpreted on the CPU): `tpu_common.py`.
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.compact import compact_xla
from pallas_kernels.pack import num_words
from pallas_kernels.sparse_gate_up import ACTIVATIONS, activate
from pallas_kernels.tpu_common import on_tpu
from pallas_kernels.tpu_gather import (
    tpu_gate,
    tpu_rows,
    tpu_up_down,
    unpack,
    weight_dtype,
    x_parts,
)
from pallas_kernels.tpu_predict import tpu_votes

PREDICTORS = ("sign", "signmag", "oracle")
WEIGHT_DTYPES = (jnp.bfloat16, jnp.float32)

def _check_weights(d: int, *weights: jnp.ndarray) -> None:
    """ValueError unless the weights are all `[F, D]` bfloat16 / float32 or all `tpu_rows`
    pairs `[F, ceil(D/2)]` uint32, of one dtype."""
    dtypes = {w.dtype for w in weights}
    if len(dtypes) != 1:
        raise ValueError(f"gate, up and down_t must share a dtype, got {sorted(map(str, dtypes))}.")
    (dtype,) = dtypes
    if dtype == jnp.uint32:
        width = -(-d // 2)
    elif dtype in WEIGHT_DTYPES:
        width = d
    else:
        raise ValueError(f"The TPU kernels take bfloat16 or float32 weights, got {dtype}: cast "
                         "them once when loading (TPUs have no float16 arithmetic).")
    f = weights[0].shape[0]
    chex.assert_shape(weights, (f, width))


def oracle_kept(x: jnp.ndarray, gate: jnp.ndarray, activation: str,
                threshold: float) -> jnp.ndarray:
    """Rows whose true activation act(gate . x) is non-zero, per neuron: `[F]` int32 (the full
    gate, in XLA: the accuracy ceiling, for evaluation)."""
    parts = x_parts(x, gate).astype(jnp.float32)
    z = sum(lax.dot_general(p, w, (((1,), (1,)), ((), ())), precision=lax.Precision.HIGHEST,
                            preferred_element_type=jnp.float32)
            for p, w in zip(parts, unpack(gate, jnp.float32), strict=True))
    return jnp.sum(activate(z, activation, threshold) != 0, axis=0, dtype=jnp.int32)


def _union(mask: jnp.ndarray, axis) -> jnp.ndarray:
    """`mask` OR-ed over the mesh axis `axis` (None: as is)."""
    if axis is None:
        return mask
    return lax.psum(mask.astype(jnp.int32), axis) > 0


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
        same as `tpu_gather.tpu_rows` pairs `[F, ceil(D/2)]` uint32, the layout a model should
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
      counts: int32 `[3]`: predicted (sum over rows of the row's predicted-active neurons),
        computed (neurons whose gate row was read), fired (neurons whose up and down rows were
        read).
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"Sparse MLP activation {activation!r} is not ReLU-family: use one of "
                         f"{', '.join(ACTIVATIONS)}.")
    if predictor not in PREDICTORS:
        raise ValueError(f"Unknown predictor {predictor!r}: use one of {', '.join(PREDICTORS)}.")
    b, d = x.shape
    alpha = jnp.asarray(alpha, jnp.float32)
    chex.assert_rank([x, alpha], [2, 0])
    _check_weights(d, gate, up, down_t)
    f = gate.shape[0]
    chex.assert_shape(gate_sign_bits, (f, num_words(d)))
    chex.assert_type(gate_sign_bits, jnp.uint32)
    interpret = not on_tpu()
    out_dtype = weight_dtype(down_t)
    gate, up, down_t = tpu_rows(gate), tpu_rows(up), tpu_rows(down_t)
    threshold = float(threshold)

    if predictor == "oracle":
        kept = oracle_kept(x, gate, activation, threshold)
    else:
        kept = tpu_votes(x, gate_sign_bits, alpha, predictor=predictor, interpret=interpret)
    idx, computed = compact_xla(_union(kept > 0, union_axis))
    a = tpu_gate(x, gate, idx, computed, activation=activation, threshold=threshold,
                 interpret=interpret)
    pos, fired = compact_xla(_union(jnp.any(a != 0, axis=0), union_axis))
    a = jnp.where(jnp.arange(f) < fired, jnp.take(a, pos, axis=1), 0.0)
    out = tpu_up_down(x, a, up, down_t, idx[pos], fired, interpret=interpret)
    counts = jnp.stack([jnp.sum(kept, dtype=jnp.int32), computed, fired])
    return out.astype(out_dtype), counts
