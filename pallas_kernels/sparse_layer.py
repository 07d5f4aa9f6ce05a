"""The whole sparse MLP of one layer for decoding, as one op: predict, then gate/up/down.

x, the layer's weights, its packed sign bits and alpha in; the output and the layer's counts out.
Each backend keeps its own representation of the active set inside (here: the XLA/reference
predictor, `compact` into an id list, then the two-stage `sparse_mlp`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels import backend as bk
from pallas_kernels.compact import compact
from pallas_kernels.portable import sparse_mlp_layer_portable
from pallas_kernels.predict import sign_predict
from pallas_kernels.predict import threshold as vote_threshold
from pallas_kernels.signmag import signmag_predict
from pallas_kernels.sparse_gate_up import activate, matmul_t
from pallas_kernels.sparse_mlp import sparse_mlp
from pallas_kernels.tpu_layer import sparse_mlp_layer_mosaic

PREDICTORS = ("sign", "signmag", "oracle")


def _predict(x, gate, bits, alpha, predictor, activation, threshold, backend):
    """(union mask `[F]`, sum over rows of per-row predicted-active neurons)."""
    if predictor == "oracle":
        rows = activate(matmul_t(x, gate), activation, threshold) != 0
    elif predictor == "signmag":
        _, n_neg, total = signmag_predict(x, bits, alpha, backend=backend)
        rows = n_neg <= vote_threshold(alpha, total[:, None])
    else:
        _, n_neg = sign_predict(x, bits, alpha, backend=backend)
        total = jnp.sum(x != 0, axis=-1, dtype=jnp.int32)
        rows = n_neg <= vote_threshold(alpha, total[:, None])
    return jnp.any(rows, axis=0), jnp.sum(rows, dtype=jnp.int32)


@functools.partial(jax.jit, static_argnames=["predictor", "activation", "threshold", "backend",
                                             "union_axis"])
def sparse_mlp_layer(x, gate, up, down_t, gate_sign_bits, alpha, *, predictor: str = "sign",
                     activation: str = "relu", threshold: float = 0.0, backend: str = "auto",
                     union_axis: str | None = None):
    """One layer's sparse MLP: (out `[B, D]` in down_t's dtype, counts `[3]` int32 =
    (predicted summed over rows, computed: gate rows read, fired: up and down rows read))."""
    kind = dict(predictor=predictor, activation=activation, threshold=float(threshold),
                union_axis=union_axis)
    path = bk.choose(backend).path
    if path == "portable":
        return sparse_mlp_layer_portable(x, gate, up, down_t, gate_sign_bits, alpha, **kind)
    if path == "mosaic":
        return sparse_mlp_layer_mosaic(x, gate, up, down_t, gate_sign_bits, alpha, **kind)
    backend = bk.resolve(backend)
    active, n_predicted = _predict(x, gate, gate_sign_bits, alpha, predictor, activation,
                                   float(threshold), backend)
    if union_axis is not None:
        active = jax.lax.psum(active.astype(jnp.int32), union_axis) > 0
    idx, computed = compact(active, backend=backend)
    out, fired = sparse_mlp(x, gate, up, down_t, idx, computed, activation=activation,
                            threshold=float(threshold), backend=backend)
    if union_axis is not None:
        fired = jax.lax.psum(fired.astype(jnp.int32), union_axis) > 0
    counts = jnp.stack([n_predicted, computed.astype(jnp.int32), jnp.sum(fired, dtype=jnp.int32)])
    return out, counts
