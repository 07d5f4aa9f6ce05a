"""The portable sparse MLP layer: plain XLA with static shapes, for any XLA device.

What runs where no Pallas kernel does: a GPU older than Pallas Triton supports (a T4 is sm_75), a
jax without Pallas' Triton backend, or any other XLA device. XLA's fast primitives want static
shapes, so instead of a loop of small gathers (the "xla" chunk loop: one host round trip and a few
small kernels a trip on a GPU, where it read at 34 GB/s on the H200) each weight is read by ONE
gather at a static capacity: the smallest of a few buckets (`capacities`) that holds the active
count, chosen on the device with `lax.switch`. Exact: the bucket always holds the count, so no
neuron is dropped; the padding slots all point at row 0 (the index list's padding, see
`compact.py`), one row a cache serves, and are masked to 0.

The two stages of `sparse_mlp`, with the same bytes:

    predict (sign, signmag or oracle) -> union over rows (and over `union_axis`) -> compact
    stage 1: gate rows of the candidates, one gather at the bucket of `count`  -> act(g) [B, F]
    fired = act(g) != 0 for some row (OR-ed over `union_axis`) -> compact the fired positions
    stage 2: up and down rows of the fired, one gather each at the bucket of `fired` -> [B, D]

The largest bucket is F itself and runs densely (a matvec reads all rows faster than a gather);
above `dense_above` of F a stage is dense, as in the chunk loop (`backend.DENSE_ABOVE`).
Products and sums are float32 whatever the weights' dtype (bfloat16, float16, float32).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import chex
import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels import backend as bk
from pallas_kernels.compact import compact_xla
from pallas_kernels.pack import num_words
from pallas_kernels.predict import sign_predict_xla
from pallas_kernels.predict import threshold as vote_threshold
from pallas_kernels.signmag import signmag_xla
from pallas_kernels.sparse_down import matmul
from pallas_kernels.sparse_gate_up import ACTIVATIONS, activate, matmul_t

PREDICTORS = ("sign", "signmag", "oracle")
# Buckets: SMALLEST rows, then each RATIO times the last, up to dense_above * F, then F (dense).
# A ratio of 2 gathers at most twice the live rows (the extra ones are the one cached padding row,
# so on a GPU they cost L2 reads, not HBM) and keeps a 7b layer at 9 branches a stage.
SMALLEST = 64
RATIO = 2


def capacities(f: int, *, smallest: int = SMALLEST, ratio: int = RATIO,
               dense_above: float = bk.DENSE_ABOVE) -> tuple[int, ...]:
    """Static bucket capacities for F neurons, ascending: the last is F (computed densely), the one
    before it `int(dense_above * F)` (the most any gather reads)."""
    top = int(dense_above * f)
    caps = []
    c = smallest
    while c < top:
        caps.append(c)
        c *= ratio
    return tuple(sorted({*caps, top, f} - {0}))


def bucket(count: jnp.ndarray, caps: tuple[int, ...]) -> jnp.ndarray:
    """The index of the smallest capacity in `caps` that holds `count` (`[]` int32)."""
    return jnp.sum(jnp.asarray(caps[:-1], jnp.int32) < count, dtype=jnp.int32)


def _switch(count: jnp.ndarray, caps: tuple[int, ...], branch: Callable, *operands):
    """`branch(cap, *operands)` for the bucket of `count`: one static-shape branch per capacity."""
    return lax.switch(bucket(count, caps), [functools.partial(branch, c) for c in caps],
                      *operands)


def gate_stage(x, gate, idx, count, caps):
    """`gate[idx[k]] . x` for k < count -> `[B, F]` float32 in compact order (garbage after
    count: the caller masks)."""
    f = gate.shape[0]

    def branch(c, x, gate, idx):
        if c == f:
            return jnp.take(matmul_t(x, gate), idx, axis=1)
        # Weights and rows through one barrier: XLA CPU would gather bf16 rows from a float32 copy
        # of the whole matrix (as in `sparse_mlp.gate_xla`); elsewhere it costs nothing.
        w, rows = lax.optimization_barrier((gate, idx[:c]))
        return jnp.pad(matmul_t(x, w[rows]), ((0, 0), (0, f - c)))

    return _switch(count, caps, branch, x, gate, idx)


def up_down_stage(x, a, up, down_t, rows, fired, caps):
    """sum_{k < fired} (a[:, k] * (up[rows[k]] . x)) * down_t[rows[k]] -> `[B, D]` float32.

    `a: [B, F]` float32 activated gates in `rows` order, 0 at positions >= fired.
    """
    f = up.shape[0]

    def branch(c, x, a, up, down_t, rows):
        if c == f:
            # Natural order; positions >= fired hold 0 and point at a real row, so add, not set.
            a_nat = jnp.zeros_like(a).at[:, rows].add(a)
            return matmul(a_nat * matmul_t(x, up), down_t)
        u, w, r = lax.optimization_barrier((up, down_t, rows[:c]))  # as in `gate_stage`
        return matmul(a[:, :c] * matmul_t(x, u[r]), w[r])

    return _switch(fired, caps, branch, x, a, up, down_t, rows)


def predict(x, gate, gate_sign_bits, alpha, *, predictor: str, activation: str,
            threshold: float):
    """Each row's predicted-active mask `[B, F]` bool (XLA forms of `predict.py`, `signmag.py`;
    "oracle" is the true mask act(gate . x) != 0)."""
    match predictor:
        case "sign":
            _, n_neg = sign_predict_xla(x, gate_sign_bits, alpha)
            total = jnp.sum(x != 0, axis=-1, dtype=jnp.int32)
        case "signmag":
            n_neg, total = signmag_xla(x, gate_sign_bits)
        case _:
            return activate(matmul_t(x, gate), activation, threshold) != 0
    return n_neg <= vote_threshold(alpha, total)[:, None]


def _union(mask: jnp.ndarray, axis: str | None) -> jnp.ndarray:
    """`mask` OR-ed over the mesh axis `axis` (as-is when None)."""
    if axis is None:
        return mask
    return lax.psum(mask.astype(jnp.int32), axis) > 0


@functools.partial(jax.jit, static_argnames=["predictor", "activation", "threshold",
                                             "union_axis", "smallest", "ratio", "dense_above"])
def sparse_mlp_layer_portable(x: jnp.ndarray, gate: jnp.ndarray, up: jnp.ndarray,
                              down_t: jnp.ndarray, gate_sign_bits: jnp.ndarray,
                              alpha: jnp.ndarray, *, predictor: str = "sign",
                              activation: str = "relu", threshold: float = 0.0,
                              union_axis: str | None = None, smallest: int = SMALLEST,
                              ratio: int = RATIO, dense_above: float = bk.DENSE_ABOVE
                              ) -> tuple[jnp.ndarray, jnp.ndarray]:
    """One decode step's sparse MLP: predict, then the two bucketed stages (module docstring).

    Args:
      x: `[B, D]` bfloat16, float16 or float32 MLP input, one token per row.
      gate, up, down_t: `[F, D]` weights, one row per neuron (down_t is W_down transposed).
      gate_sign_bits: `[F, ceil(D/32)]` uint32 packed sign bits of gate (`pack.py`).
      alpha: `[]` float32 conservativeness (data: changing it does not recompile).
      predictor: "sign", "signmag" or "oracle" (static).
      activation: "relu" or "fatrelu"; threshold: FATReLU's (static).
      union_axis: None, or a mesh axis name (inside `shard_map`) over which the candidate union
        and the fired mask are OR-ed, so results do not depend on how the batch is split.
      smallest, ratio, dense_above: the buckets (`capacities`; static).

    Returns:
      out: `[B, D]` in down_t's dtype, accumulated in float32.
      counts: `[3]` int32 (predicted: this call's rows' predicted-active neurons summed over the
        rows; computed: candidates, whose gate rows were read; fired: candidates whose up and
        down rows were read). computed and fired are of the union over `union_axis`.
    """
    if predictor not in PREDICTORS:
        raise ValueError(f"Unknown predictor {predictor!r}: use one of {', '.join(PREDICTORS)}.")
    if activation not in ACTIVATIONS:
        raise ValueError(f"Sparse MLP activation {activation!r} is not ReLU-family: use one of "
                         f"{', '.join(ACTIVATIONS)}.")
    f, d = gate.shape
    alpha = jnp.asarray(alpha, jnp.float32)
    chex.assert_rank([x, alpha], [2, 0])
    chex.assert_shape([x, up, down_t, gate_sign_bits],
                      [(None, d), (f, d), (f, d), (f, num_words(d))])
    chex.assert_type(gate_sign_bits, jnp.uint32)
    kind = dict(activation=activation, threshold=float(threshold))
    caps = capacities(f, smallest=smallest, ratio=ratio, dense_above=dense_above)

    rows_active = predict(x, gate, gate_sign_bits, alpha, predictor=predictor, **kind)
    idx, count = compact_xla(_union(jnp.any(rows_active, axis=0), union_axis))
    live = jnp.arange(f) < count
    a = jnp.where(live, activate(gate_stage(x, gate, idx, count, caps), activation,
                                 kind["threshold"]), 0.0)
    # Every shard of union_axis holds the same candidates in the same order, so compact
    # positions line up and the fired masks can be OR-ed position by position.
    pos, fired = compact_xla(_union(jnp.any(a != 0, axis=0), union_axis))
    a = jnp.where(jnp.arange(f) < fired, jnp.take(a, pos, axis=1), 0.0)
    out = up_down_stage(x, a, up, down_t, idx[pos], fired, caps)
    counts = jnp.stack([jnp.sum(rows_active, dtype=jnp.int32), count, fired])
    return out.astype(down_t.dtype), counts
