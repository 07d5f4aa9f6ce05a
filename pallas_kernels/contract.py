"""The sparse MLP layer's contract, written once and called by every backend.

What every path of `layer.sparse_mlp_layer` shares (`gpu/`, `tpu/`, `xla/` and the reference):
- the names it accepts (`PREDICTORS`, `ACTIVATIONS`) and its argument checks (`check_layer_args`);
- the activation and the float32 products (`activate`, `matmul_t`, `matmul`);
- each row's predicted-active mask from a backend's votes (`row_masks`; the XLA and reference
  votes, `xla_votes` and `reference_votes`, each made by `votes_of`);
- the union over a mesh axis the batch is split over (`union`, `total`) and the counts the op
  returns (`counts`);
- compaction: a neuron mask into an ascending id list (`compact`), and the second compaction of
  the candidates that fired (`compact_fired`).

Compaction is a cumsum that gives each active neuron its slot and one scatter that writes the ids:
a few microseconds on the CPU. On an H200 XLA made several kernels of it, 24 us at F = 11008
(benchmarks/gpu_variants.py, 2026-11-29): the GPU path's kernels need no id list (each compacts
its own block in registers, `gpu/layer.py`).
"""

from __future__ import annotations

from collections.abc import Callable

import chex
import jax.numpy as jnp
from jax import lax

from pallas_kernels import quant
from pallas_kernels.pack import num_words
from pallas_kernels.predict import sign_predict_reference, sign_predict_xla, threshold
from pallas_kernels.signmag import signmag_reference, signmag_xla

PREDICTORS = ("sign", "signmag", "oracle")
ACTIVATIONS = ("relu", "fatrelu")


def activate(z: jnp.ndarray, activation: str, threshold: float) -> jnp.ndarray:
    """The ReLU-family activation on float32 pre-activations: "relu" = max(z, 0); "fatrelu" = z
    if z > threshold else 0 (ProSparse's FATReLU, strict >)."""
    if activation == "fatrelu":
        return jnp.where(z > threshold, z, 0.0)
    return jnp.maximum(z, 0.0)


def matmul_t(x: jnp.ndarray, w: jnp.ndarray, precision=None) -> jnp.ndarray:
    """`x: [B, D]` times `w: [K, D]` transposed -> `[B, K]` float32. With a `precision` (the
    references) mixed dtypes are promoted; else by `quant.float_dot`'s rule, x cast to a 16-bit
    weight's dtype, so no float32 copy of the weight is made."""
    if precision is None:
        return quant.matmul_t(x, w, None)
    dt = jnp.promote_types(x.dtype, w.dtype)
    return lax.dot_general(x.astype(dt), w.astype(dt), (((1,), (1,)), ((), ())),
                           precision=precision, preferred_element_type=jnp.float32)


def matmul(h: jnp.ndarray, w: jnp.ndarray) -> jnp.ndarray:
    """`h: [B, K]` float32 times `w: [K, D]` -> `[B, D]` float32, contracting w's leading axis
    (`quant.float_dot`'s rule: h cast to a 16-bit weight's dtype).

    w's rows stay contiguous: a contraction over its last axis (`w.T`) made XLA CPU read the
    matrix in a transposed, cache-hostile order (10-30x slower at 1B shapes, measured).
    """
    return quant.matmul(h, w, None)


def out_dtype(x: jnp.ndarray, down_t: jnp.ndarray) -> jnp.dtype:
    """The layer's output dtype: down_t's, or x's (the compute dtype) when down_t is int8."""
    return x.dtype if down_t.dtype == jnp.int8 else down_t.dtype


def check_layer_args(x, gate, up, down_t, gate_sign_bits, alpha, *, predictor: str,
                     activation: str, row_width: int | None = None,
                     scales=None) -> jnp.ndarray:
    """ValueError for an unknown predictor or activation, or `x` not `[B, D]` with B >= 1; chex
    errors for shapes and dtypes. Returns alpha as a float32 scalar.

    `row_width`: the weights' stored row width when it is not D (`tpu/gather.py`'s packed pairs).
    `scales`: None with float weights, or three `[F]` float32 row scales with int8 ones.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"Sparse MLP activation {activation!r} is not ReLU-family: use one of "
                         f"{', '.join(ACTIVATIONS)}.")
    if predictor not in PREDICTORS:
        raise ValueError(f"Unknown predictor {predictor!r}: use one of {', '.join(PREDICTORS)}.")
    if x.ndim != 2 or x.shape[0] < 1:
        raise ValueError(f"x must be [B, D] with B >= 1 (one token per row), got {x.shape}.")
    d = x.shape[1]
    f = gate.shape[0]
    width = d if row_width is None else row_width
    alpha = jnp.asarray(alpha, jnp.float32)
    chex.assert_rank(alpha, 0)
    chex.assert_shape([gate, up, down_t, gate_sign_bits],
                      [(f, width), (f, width), (f, width), (f, num_words(d))])
    chex.assert_type(gate_sign_bits, jnp.uint32)
    quantized = [w.dtype == jnp.int8 for w in (gate, up, down_t)]
    if scales is None:
        if any(quantized):
            raise ValueError("int8 weights need their row scales: pass scales=(gate, up, down).")
    else:
        if not all(quantized):
            raise ValueError("scales are for int8 weights; gate, up and down_t are "
                             f"{gate.dtype}, {up.dtype}, {down_t.dtype}.")
        chex.assert_shape(list(scales), [(f,)] * 3)
        chex.assert_type(list(scales), [jnp.float32] * 3)
    return alpha


def row_masks(x, gate, gate_sign_bits, alpha, *, predictor: str, activation: str,
              threshold_value: float, votes: Callable, precision=None,
              gate_scale=None) -> jnp.ndarray:
    """Each row's predicted-active neurons `[B, F]` bool.

    `votes(x, gate_sign_bits, predictor) -> (n_neg [B, F], total [B])` is the backend's vote
    ("sign" or "signmag"); a row keeps a neuron iff `n_neg <= threshold(alpha, total)`. "oracle"
    is the true mask act(gate . x) != 0 (at `precision`; an int8 gate with its `[F]`
    `gate_scale` through `quant.dot`).
    """
    if predictor == "oracle":
        if gate_scale is not None:
            g = quant.dot(x, gate, gate_scale, 1)
        else:
            g = matmul_t(x, gate, precision)
        return activate(g, activation, threshold_value) != 0
    n_neg, total = votes(x, gate_sign_bits, predictor)
    return n_neg <= threshold(alpha, total)[:, None]


def votes_of(sign, signmag) -> Callable:
    """A backend's votes for `row_masks` from its two predictors: `sign(x, bits, alpha) ->
    (active, n_neg)` and `signmag(x, bits) -> (n_neg, total)`. The sign vote's total is the
    non-zero inputs (zeros never vote); its alpha is unused here (`row_masks` thresholds)."""

    def votes(x, gate_sign_bits, predictor: str):
        if predictor == "signmag":
            return signmag(x, gate_sign_bits)
        _, n_neg = sign(x, gate_sign_bits, jnp.float32(1.0))
        return n_neg, jnp.sum(x != 0, axis=-1, dtype=jnp.int32)

    return votes


# The votes in plain XLA (packed XOR + popcount), and on unpacked bits (the truth).
xla_votes = votes_of(sign_predict_xla, signmag_xla)
reference_votes = votes_of(sign_predict_reference, signmag_reference)


def union(mask: jnp.ndarray, axis: str | None) -> jnp.ndarray:
    """`[F]` bool OR-ed over the mesh axis `axis` the batch is split over (None: as is)."""
    if axis is None:
        return mask
    return lax.psum(mask.astype(jnp.int32), axis) > 0


def total(n: jnp.ndarray, axis: str | None) -> jnp.ndarray:
    """A count summed over the mesh axis `axis` (None: as is)."""
    return n if axis is None else lax.psum(n, axis)


def counts(predicted, computed, fired) -> jnp.ndarray:
    """The op's int32 `[3]` counts; each argument a count or a mask to count."""
    return jnp.stack([jnp.sum(jnp.asarray(v), dtype=jnp.int32)
                      for v in (predicted, computed, fired)])


def compact(active: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Active neuron ids in ascending order, padded with 0, and their count.

    Args:
      active: `[F]` bool mask.

    Returns:
      idx: `[F]` int32, the active ids in idx[:count] ascending, 0 after (a valid row, so
        gathers through idx never go out of bounds).
      count: `[]` int32 number of active neurons.
    """
    chex.assert_rank(active, 1)
    chex.assert_type(active, bool)
    f = active.shape[0]
    slot = jnp.cumsum(active, dtype=jnp.int32) - 1
    # Inactive neurons aim past the end and are dropped; untouched slots keep their 0.
    slot = jnp.where(active, slot, f)
    idx = jnp.zeros((f,), jnp.int32).at[slot].set(jnp.arange(f, dtype=jnp.int32), mode="drop")
    return idx, jnp.sum(active, dtype=jnp.int32)


def compact_fired(a: jnp.ndarray, idx: jnp.ndarray, axis: str | None
                  ) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """The second compaction: the candidates that fire, for the up and down stage.

    Args:
      a: `[B, F]` float32 activated gates of the candidates in compact order (0 past the count).
      idx: `[F]` int32 the candidates' neuron ids (from `compact`).
      axis: the mesh axis the batch is split over, or None. Every shard holds the same candidates
        in the same order, so the fired masks are OR-ed position by position.

    Returns:
      a: `[B, F]` the fired candidates' gates, compacted (0 at positions >= fired);
      rows: `[F]` int32 their neuron ids; fired: `[]` int32 how many fired.
    """
    pos, fired = compact(union(jnp.any(a != 0, axis=0), axis))
    a = jnp.where(jnp.arange(a.shape[1]) < fired, jnp.take(a, pos, axis=1), 0.0)
    return a, idx[pos], fired
