"""The per-layer sparse MLP op: one call per layer and decode step, every backend behind it.

    out, counts = sparse_mlp_layer(x, gate, up, down_t, gate_sign_bits, alpha, predictor="sign")

The layer predicts which neurons are active (the union over the batch's rows), reads the gate
rows of those, and the up and down rows of the ones whose activated gate is non-zero for some row
(they fire): out = sum over fired i of act(gate_i . x) * (up_i . x) * down_t_i, in float32, cast
to down_t's dtype. A neuron that is predicted but does not fire contributes act(g) * u = 0, so
the output is the dense MLP restricted to the predicted neurons, exactly.

counts, int32 [3]:
- predicted: sum over rows of that row's predicted-active neurons;
- computed: neurons whose gate row was read (the union of the rows' predictions);
- fired: neurons whose up and down rows were read (act(gate . x) != 0 for some row).

`union_axis` names a mesh axis the batch is split over (inside `shard_map`): the union of the
predictions and the fired mask are OR-ed over it (psum > 0) and `predicted` is summed over it,
so the output and all three counts do not depend on how the batch is split.

Backends ("auto" picks by device, `backend.choose`; "mosaic" is `tpu_layer`'s TPU kernels and
"portable" `portable.py`'s bucketed XLA path, each with this signature):
- "reference": plain jnp over every neuron, masked: the truth.
- "xla": the predictor's XLA path, `compact`, then `sparse_mlp.sparse_mlp_xla` (chunk loops over
  the candidates and the fired): the CPU path.
- "pallas": two Triton kernels, `predict_gate_up` (the vote, gate and up, h in natural order) and
  `masked_down` (down over the rows where h != 0), no compaction between them. With
  `union_axis`, or the "oracle" predictor, the active mask is computed first (the predictor's own
  kernel, or XLA's dense gate) and read by `predict_gate_up` instead of its vote.
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels import backend as bk
from pallas_kernels.compact import compact
from pallas_kernels.masked_down import masked_down_pallas, masked_down_reference
from pallas_kernels.pack import num_words
from pallas_kernels.portable import sparse_mlp_layer_portable
from pallas_kernels.predict import sign_predict, threshold
from pallas_kernels.predict_gate_up import predict_gate_up_pallas, predict_gate_up_reference
from pallas_kernels.signmag import signmag_predict
from pallas_kernels.sparse_gate_up import ACTIVATIONS, activate, matmul_t
from pallas_kernels.sparse_mlp import sparse_mlp_xla
from pallas_kernels.tpu_layer import sparse_mlp_layer_mosaic

PREDICTORS = ("sign", "signmag", "oracle")
# How the Pallas path's down kernel adds its row blocks (`masked_down.ACCUMULATE`).
ACCUMULATE = "partials"


def _union(mask: jnp.ndarray, union_axis) -> jnp.ndarray:
    """`[F]` bool OR-ed over the mesh axis `union_axis` (None: as is)."""
    if union_axis is None:
        return mask
    return lax.psum(mask.astype(jnp.int32), union_axis) > 0


def _total(n: jnp.ndarray, union_axis) -> jnp.ndarray:
    return n if union_axis is None else lax.psum(n, union_axis)


def row_masks(x, gate, gate_sign_bits, alpha, *, predictor: str, activation: str,
              threshold_value: float, backend: str) -> jnp.ndarray:
    """Each row's predicted-active neurons `[B, F]` bool, on `backend`'s predictor."""
    if predictor == "oracle":
        g = matmul_t(x, gate, precision=lax.Precision.HIGHEST if backend == "reference" else None)
        return activate(g, activation, threshold_value) != 0
    if predictor == "signmag":
        _, n_neg, total = signmag_predict(x, gate_sign_bits, alpha, backend=backend)
    else:
        _, n_neg = sign_predict(x, gate_sign_bits, alpha, backend=backend)
        total = jnp.sum(x != 0, axis=-1, dtype=jnp.int32)
    return n_neg <= threshold(alpha, total)[:, None]


def _counts(predicted, computed, fired) -> jnp.ndarray:
    return jnp.stack([jnp.asarray(predicted, jnp.int32), jnp.sum(computed, dtype=jnp.int32),
                      jnp.sum(fired, dtype=jnp.int32)])


def layer_reference(x, gate, up, down_t, gate_sign_bits, alpha, *, predictor: str,
                    activation: str, threshold: float, union_axis=None):
    """Every neuron computed in plain jnp, masked to the union: (out float32, counts)."""
    per_row = row_masks(x, gate, gate_sign_bits, alpha, predictor=predictor,
                        activation=activation, threshold_value=threshold, backend="reference")
    active = _union(jnp.any(per_row, axis=0), union_axis)
    h, fired = predict_gate_up_reference(x, gate, up, active, activation=activation,
                                         threshold=threshold)
    fired = _union(fired, union_axis)
    predicted = _total(jnp.sum(per_row, dtype=jnp.int32), union_axis)
    return masked_down_reference(h, down_t), _counts(predicted, active, fired)


def layer_xla(x, gate, up, down_t, gate_sign_bits, alpha, *, predictor: str, activation: str,
              threshold: float, union_axis=None):
    """The predictor's XLA path, `compact`, then the two-stage `sparse_mlp_xla`."""
    per_row = row_masks(x, gate, gate_sign_bits, alpha, predictor=predictor,
                        activation=activation, threshold_value=threshold, backend="xla")
    active = _union(jnp.any(per_row, axis=0), union_axis)
    idx, count = compact(active, backend="xla")
    out, fired = sparse_mlp_xla(x, gate, up, down_t, idx, count, activation=activation,
                                threshold=threshold)
    # fired is in compact order, the same order on every shard (one union).
    fired = _union(fired, union_axis)
    predicted = _total(jnp.sum(per_row, dtype=jnp.int32), union_axis)
    return out, _counts(predicted, active, fired)


def layer_pallas(x, gate, up, down_t, gate_sign_bits, alpha, *, predictor: str, activation: str,
                 threshold: float, union_axis=None, accumulate: str = ACCUMULATE,
                 interpret: bool | None = None, **blocks):
    """`predict_gate_up` then `masked_down` (Triton; interpret mode off a GPU).

    `blocks` go to `predict_gate_up_pallas` (prefix `up_`: block_f, slots, tile, num_warps) and
    `masked_down_pallas` (prefix `down_`: block_r, block_d, slots, tile, num_warps): for timing
    launch shapes (`benchmarks/gpu_variants.py`).
    """
    interpret = bk.interpret() if interpret is None else interpret
    up_blocks = {k[3:]: v for k, v in blocks.items() if k.startswith("up_")}
    down_blocks = {k[5:]: v for k, v in blocks.items() if k.startswith("down_")}
    assert len(up_blocks) + len(down_blocks) == len(blocks), blocks
    kind = dict(activation=activation, threshold=threshold, zero_out=accumulate == "atomic",
                interpret=interpret, **up_blocks)
    if predictor == "oracle" or union_axis is not None:
        per_row = row_masks(x, gate, gate_sign_bits, alpha, predictor=predictor,
                            activation=activation, threshold_value=threshold, backend="pallas")
        active = _union(jnp.any(per_row, axis=0), union_axis)
        h, flags, _, *acc = predict_gate_up_pallas(x, gate, up, mask=active, vote="mask", **kind)
        predicted = _total(jnp.sum(per_row, dtype=jnp.int32), union_axis)
    else:
        h, flags, partial, *acc = predict_gate_up_pallas(x, gate, up, alpha=alpha,
                                                         bits=gate_sign_bits, vote=predictor,
                                                         **kind)
        predicted = jnp.sum(partial)
    out = masked_down_pallas(h, down_t, *acc, accumulate=accumulate, interpret=interpret,
                             **down_blocks)
    computed, fired = (flags & 1) != 0, _union((flags & 2) != 0, union_axis)
    return out, _counts(predicted, computed, fired)


@functools.partial(jax.jit,
                   static_argnames=["predictor", "activation", "threshold", "backend",
                                    "union_axis"])
def sparse_mlp_layer(x: jnp.ndarray, gate: jnp.ndarray, up: jnp.ndarray, down_t: jnp.ndarray,
                     gate_sign_bits: jnp.ndarray, alpha: jnp.ndarray, *, predictor: str = "sign",
                     activation: str = "relu", threshold: float = 0.0, backend: str = "auto",
                     union_axis=None) -> tuple[jnp.ndarray, jnp.ndarray]:
    """One layer's sparse MLP for one token per row (decoding); see the module docstring.

    Args:
      x: `[B, D]` bfloat16, float16 or float32 MLP input (B >= 1).
      gate, up, down_t: `[F, D]` weights, one row per neuron (down_t is W_down transposed).
      gate_sign_bits: `[F, ceil(D/32)]` uint32 packed sign bits of gate (`pack.py`).
      alpha: `[]` float32 conservativeness (data: changing it does not recompile).
      predictor: "sign", "signmag" or "oracle" (the true mask from the full gate).
      activation: "relu" or "fatrelu"; threshold: FATReLU's (ignored by "relu").
      backend: one of `backend.BACKENDS`.
      union_axis: None, or the mesh axis name the batch is split over (inside `shard_map`).

    Returns:
      out: `[B, D]` in down_t's dtype, accumulated in float32.
      counts: int32 `[3]`: predicted, computed, fired.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"Sparse MLP activation {activation!r} is not ReLU-family: use one of "
                         f"{', '.join(ACTIVATIONS)}.")
    if predictor not in PREDICTORS:
        raise ValueError(f"Unknown predictor {predictor!r}: use one of {', '.join(PREDICTORS)}.")
    if x.ndim != 2 or x.shape[0] < 1:
        raise ValueError(f"x must be [B, D] with B >= 1 (one token per row), got {x.shape}.")
    f, d = gate.shape
    alpha = jnp.asarray(alpha, jnp.float32)
    chex.assert_rank(alpha, 0)
    chex.assert_shape([x, up, down_t, gate_sign_bits], [(None, d), (f, d), (f, d),
                                                       (f, num_words(d))])
    chex.assert_type(gate_sign_bits, jnp.uint32)
    kind = dict(predictor=predictor, activation=activation, threshold=float(threshold),
                union_axis=union_axis)
    args = (x, gate, up, down_t, gate_sign_bits, alpha)
    match bk.choose(backend).path:
        case "pallas":
            out, counts = layer_pallas(*args, **kind)
        case "mosaic":
            out, counts = sparse_mlp_layer_mosaic(*args, **kind)
        case "portable":
            out, counts = sparse_mlp_layer_portable(*args, **kind)
        case "xla":
            out, counts = layer_xla(*args, **kind)
        case _:
            out, counts = layer_reference(*args, **kind)
    return out.astype(down_t.dtype), counts
