"""The ops a model calls, each dispatched to a backend: the per-layer sparse MLP and the votes.

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

Paths (`backend.choose` picks one for "auto"; the contract they share is `contract.py`):
- "pallas": `gpu/layer.py`, two Triton kernels (CUDA GPUs of compute capability >= 8.0);
- "mosaic": `tpu/layer.py`, the Pallas TPU kernels;
- "portable": `xla/portable.py`, plain XLA at bucketed static shapes (any XLA device);
- "xla": `xla/chunk_loop.py`, loops over 64-row chunks (the CPU's path);
- "reference": `layer_reference` below, every neuron in plain jnp, masked: the truth.

`sign_predict` and `signmag_predict` are the predictors alone, for a full forward (T > 1) and for
statistics: the Triton kernel on "pallas", the jnp reference on "reference", XLA elsewhere.
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels import backend as bk
from pallas_kernels import contract, quant
from pallas_kernels.gpu.layer import layer_pallas
from pallas_kernels.gpu.masked_down import masked_down_reference
from pallas_kernels.gpu.predict import sign_predict_pallas
from pallas_kernels.gpu.predict_gate_up import predict_gate_up_reference
from pallas_kernels.gpu.signmag import signmag_pallas
from pallas_kernels.pack import num_words
from pallas_kernels.predict import sign_predict_reference, sign_predict_xla, threshold
from pallas_kernels.signmag import PLANES, signmag_reference, signmag_xla
from pallas_kernels.tpu.layer import sparse_mlp_layer_mosaic
from pallas_kernels.tpu.layout import from_tpu_rows, weight_dtype
from pallas_kernels.xla.chunk_loop import layer_xla
from pallas_kernels.xla.portable import sparse_mlp_layer_portable


def layer_reference(x, gate, up, down_t, gate_sign_bits, alpha, *, predictor: str,
                    activation: str, threshold: float, union_axis=None, scales=None):
    """Every neuron computed in plain jnp, masked to the union: (out float32, counts). int8
    weights (`scales` given) are dequantised first: the truth the int8 paths are held to."""
    if scales is not None:
        gate, up, down_t = (quant.dequantize(w, s)
                            for w, s in zip((gate, up, down_t), scales, strict=True))
    per_row = contract.row_masks(x, gate, gate_sign_bits, alpha, predictor=predictor,
                                 activation=activation, threshold_value=threshold,
                                 votes=contract.reference_votes, precision=lax.Precision.HIGHEST)
    active = contract.union(jnp.any(per_row, axis=0), union_axis)
    h, fired = predict_gate_up_reference(x, gate, up, active, activation=activation,
                                         threshold=threshold)
    predicted = contract.total(jnp.sum(per_row, dtype=jnp.int32), union_axis)
    return (masked_down_reference(h, down_t),
            contract.counts(predicted, active, contract.union(fired, union_axis)))


# The paths that read int8 rows; the others fall back to the portable path for int8, said once.
INT8_PATHS = ("portable", "xla", "reference")


def int8_path(path: str) -> str:
    """The path an int8 layer runs where `path` was chosen: `path` itself when it reads int8
    rows (INT8_PATHS), else "portable", with a RuntimeWarning the first time."""
    if path in INT8_PATHS:
        return path
    bk.say_once(f"the {path} sparse MLP kernels do not read int8 weights yet: int8 layers run "
                "the portable XLA path")
    return "portable"


@functools.partial(jax.jit,
                   static_argnames=["predictor", "activation", "threshold", "backend",
                                    "union_axis"])
def sparse_mlp_layer(x: jnp.ndarray, gate: jnp.ndarray, up: jnp.ndarray, down_t: jnp.ndarray,
                     gate_sign_bits: jnp.ndarray, alpha: jnp.ndarray, *, predictor: str = "sign",
                     activation: str = "relu", threshold: float = 0.0, backend: str = "auto",
                     union_axis=None, scales=None) -> tuple[jnp.ndarray, jnp.ndarray]:
    """One layer's sparse MLP for one token per row (decoding); see the module docstring.

    Args:
      x: `[B, D]` bfloat16, float16 or float32 MLP input (B >= 1).
      gate, up, down_t: `[F, D]` weights, one row per neuron (down_t is W_down transposed), or
        all three in the TPU kernels' layout (`tpu.layout.tpu_rows`, bfloat16 as uint32 pairs):
        the "mosaic" path reads it as it is, any other re-lays it every call (said once).
      gate_sign_bits: `[F, ceil(D/32)]` uint32 packed sign bits of gate (`pack.py`).
      alpha: `[]` float32 conservativeness (data: changing it does not recompile).
      predictor: "sign", "signmag" or "oracle" (the true mask from the full gate).
      activation: "relu" or "fatrelu"; threshold: FATReLU's (ignored by "relu").
      backend: one of `backend.BACKENDS`.
      union_axis: None, or the mesh axis name the batch is split over (inside `shard_map`).
      scales: None for float weights; for int8 gate, up and down_t (`quant.py`), their `[F]`
        float32 row scales `(gate_scale, up_scale, down_scale)`.

    Returns:
      out: `[B, D]` in the weights' dtype (bfloat16 for the TPU layout, x's for int8 weights),
        accumulated in float32.
      counts: int32 `[3]`: predicted, computed, fired.
    """
    kind = dict(predictor=predictor, activation=activation, threshold=float(threshold),
                union_axis=union_axis)
    path = bk.choose(backend).path
    if scales is not None:
        path = int8_path(path)
        kind["scales"] = tuple(scales)
    if path == "mosaic":  # it takes `[F, D]` weights and their TPU layout, and checks them
        out, counts = sparse_mlp_layer_mosaic(x, gate, up, down_t, gate_sign_bits, alpha, **kind)
        return out.astype(weight_dtype(down_t)), counts
    if any(w.dtype == jnp.uint32 for w in (gate, up, down_t)):
        bk.say_once(f"The MLP weights are laid out for the TPU kernels; the {path} path re-lays "
                    "them on every call (slow): use backend 'auto' or 'mosaic' on a TPU.")
        gate, up, down_t = (from_tpu_rows(w, x.shape[-1]) for w in (gate, up, down_t))
    alpha = contract.check_layer_args(x, gate, up, down_t, gate_sign_bits, alpha,
                                      predictor=predictor, activation=activation, scales=scales)
    args = (x, gate, up, down_t, gate_sign_bits, alpha)
    match path:
        case "pallas":
            out, counts = layer_pallas(*args, **kind)
        case "portable":
            out, counts = sparse_mlp_layer_portable(*args, **kind)
        case "xla":
            out, counts = layer_xla(*args, **kind)
        case _:
            out, counts = layer_reference(*args, **kind)
    return out.astype(contract.out_dtype(x, down_t)), counts


def _check_votes(x, w_bits, alpha) -> jnp.ndarray:
    alpha = jnp.asarray(alpha, jnp.float32)
    chex.assert_rank([x, alpha], [2, 0])
    chex.assert_shape(w_bits, (None, num_words(x.shape[-1])))
    chex.assert_type(w_bits, jnp.uint32)
    return alpha


@functools.partial(jax.jit, static_argnames=["backend"])
def sign_predict(x: jnp.ndarray, w_bits: jnp.ndarray, alpha: jnp.ndarray, *,
                 backend: str = "auto") -> tuple[jnp.ndarray, jnp.ndarray]:
    """Predicts the active neurons of a ReLU MLP from sign bits (`predict.py`'s rule).

    Args:
      x: `[B, D]` float MLP input.
      w_bits: `[F, ceil(D/32)]` uint32 packed sign bits of W_gate (`pack.py`).
      alpha: `[]` float32 conservativeness (data: changing it does not recompile).
      backend: one of `backend.BACKENDS`.

    Returns:
      active: `[F]` bool, predicted active for at least one row (the union over B).
      n_neg: `[B, F]` int32 negative-product counts N_neg.
    """
    alpha = _check_votes(x, w_bits, alpha)
    match bk.resolve(backend):
        case "pallas":
            active, n_neg = sign_predict_pallas(x, w_bits, alpha, interpret=bk.interpret())
            return active == 1, n_neg
        case "xla":
            return sign_predict_xla(x, w_bits, alpha)
        case _:
            return sign_predict_reference(x, w_bits, alpha)


@functools.partial(jax.jit, static_argnames=["backend", "planes"])
def signmag_predict(x: jnp.ndarray, w_bits: jnp.ndarray, alpha: jnp.ndarray, *,
                    backend: str = "auto", planes: int = PLANES
                    ) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """Predicts the active neurons from sign bits and quantised input magnitudes (`signmag.py`).

    Args:
      x: `[B, D]` float MLP input.
      w_bits: `[F, ceil(D/32)]` uint32 packed sign bits of W_gate (`pack.py`).
      alpha: `[]` float32 conservativeness (data: changing it does not recompile).
      backend: one of `backend.BACKENDS`.
      planes: bits of each input's quantised magnitude (static).

    Returns:
      active: `[F]` bool, predicted active for at least one row (the union over B).
      n_neg: `[B, F]` int32 weighted negative votes.
      total: `[B]` int32 total weight of each row's votes (the rule's "n" for `threshold`).
    """
    alpha = _check_votes(x, w_bits, alpha)
    match bk.resolve(backend):
        case "pallas":
            n_neg, total = signmag_pallas(x, w_bits, planes=planes, interpret=bk.interpret())
        case "xla":
            n_neg, total = signmag_xla(x, w_bits, planes=planes)
        case _:
            n_neg, total = signmag_reference(x, w_bits, planes=planes)
    tau = threshold(alpha, total)
    return jnp.any(n_neg <= tau[:, None], axis=0), n_neg, total
