"""The portable sparse MLP layer: plain XLA with static shapes, for any XLA device.

What runs where no Pallas kernel does: a GPU older than Pallas Triton supports (a T4 is sm_75), a
jax without Pallas' Triton backend, or any other XLA device. XLA's fast primitives want static
shapes, so instead of a loop of small gathers (the "xla" chunk loop: one host round trip and a few
small kernels a trip on a GPU, where it read at 34 GB/s on the H200) each weight is read by ONE
gather at a static capacity: the smallest of a few buckets (`capacities`) that holds the active
count, chosen on the device with `lax.switch`. Exact: the bucket always holds the count, so no
neuron is dropped; the padding slots all point at row 0 (the index list's padding, see
`contract.compact`), one row a cache serves, and are masked to 0.

The two stages of the chunk loop (`chunk_loop.py`), with the same bytes:

    predict (sign, signmag or oracle) -> union over rows (and over `union_axis`) -> compact
    stage 1: gate rows of the candidates, one gather at the bucket of `count`  -> act(g) [B, F]
    fired = act(g) != 0 for some row (OR-ed over `union_axis`) -> compact the fired positions
    stage 2: up and down rows of the fired, one gather each at the bucket of `fired` -> [B, D]

The largest bucket is F itself and runs densely (a matvec reads all rows faster than a gather);
above `dense_above` of F a stage is dense (`DENSE_ABOVE`, below the chunk loop's half: see there).
Products and sums are float32 whatever the weights' dtype (bfloat16, float16, float32).
Reference the tests compare it against: the rule in numpy, as `layer.layer_reference` computes it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels import contract, quant
from pallas_kernels.contract import activate

# Above this share of F a stage computes densely. Below the chunk loop's 0.5: with more than one
# row (a batch, or a dot cuBLAS takes) XLA writes a bucket's gathered rows out before the product
# reads them back, so a bucket of F/2 rows moves about as many bytes as the dense product (the
# compile report's loop check flagged those gathers at half a weight on the T4 spec).
DENSE_ABOVE = 0.375
# Buckets: SMALLEST rows, then each RATIO times the last, up to dense_above * F, then F (dense).
# A ratio of 2 gathers at most twice the live rows (the extra ones are the one cached padding row,
# so on a GPU they cost L2 reads, not HBM) and keeps a 7b layer at 9 branches a stage.
SMALLEST = 64
RATIO = 2


def capacities(f: int, *, smallest: int = SMALLEST, ratio: int = RATIO,
               dense_above: float = DENSE_ABOVE) -> tuple[int, ...]:
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


def gate_stage(x, gate, idx, count, caps, scale=None):
    """`gate[idx[k]] . x` for k < count -> `[B, F]` float32 in compact order (garbage after
    count: the caller masks). `scale`: an int8 gate's `[F]` row scales, or None."""
    f = gate.shape[0]

    def branch(c, x, gate, idx):
        if c == f:
            return jnp.take(quant.matmul_t(x, gate, scale), idx, axis=1)
        # Weights and rows through one barrier: XLA CPU would gather bf16 rows from a float32 copy
        # of the whole matrix (as in `chunk_loop.gate_xla`); elsewhere it costs nothing.
        w, rows = lax.optimization_barrier((gate, idx[:c]))
        return jnp.pad(quant.gathered_t(x, w, scale, rows), ((0, 0), (0, f - c)))

    return _switch(count, caps, branch, x, gate, idx)


def up_down_stage(x, a, up, down_t, rows, fired, caps, scales=(None, None)):
    """sum_{k < fired} (a[:, k] * (up[rows[k]] . x)) * down_t[rows[k]] -> `[B, D]` float32.

    `a: [B, F]` float32 activated gates in `rows` order, 0 at positions >= fired. `scales`: the
    `[F]` row scales of int8 up and down_t, or None each.
    """
    f = up.shape[0]
    up_scale, down_scale = scales

    def branch(c, x, a, up, down_t, rows):
        if c == f:
            # Natural order; positions >= fired hold 0 and point at a real row, so add, not set.
            a_nat = jnp.zeros_like(a).at[:, rows].add(a)
            return quant.matmul(a_nat * quant.matmul_t(x, up, up_scale), down_t, down_scale)
        u, w, r = lax.optimization_barrier((up, down_t, rows[:c]))  # as in `gate_stage`
        return quant.gathered(a[:, :c] * quant.gathered_t(x, u, up_scale, r), w, down_scale, r)

    return _switch(fired, caps, branch, x, a, up, down_t, rows)


@functools.partial(jax.jit, static_argnames=["predictor", "activation", "threshold",
                                             "union_axis", "smallest", "ratio", "dense_above"])
def sparse_mlp_layer_portable(x: jnp.ndarray, gate: jnp.ndarray, up: jnp.ndarray,
                              down_t: jnp.ndarray, gate_sign_bits: jnp.ndarray,
                              alpha: jnp.ndarray, *, predictor: str = "sign",
                              activation: str = "relu", threshold: float = 0.0,
                              union_axis: str | None = None, smallest: int = SMALLEST,
                              ratio: int = RATIO, dense_above: float = DENSE_ABOVE,
                              scales=None) -> tuple[jnp.ndarray, jnp.ndarray]:
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
      scales: None, or the `[F]` float32 row scales of int8 (gate, up, down_t) (`quant.py`):
        int8 rows are gathered and converted after the gather, with their scales.

    Returns:
      out: `[B, D]` in down_t's dtype (x's for int8 weights), accumulated in float32.
      counts: `[3]` int32 (predicted: the rows' predicted-active neurons summed over the rows and
        over `union_axis`; computed: candidates, whose gate rows were read; fired: candidates
        whose up and down rows were read; both of the union over `union_axis`).
    """
    alpha = contract.check_layer_args(x, gate, up, down_t, gate_sign_bits, alpha,
                                      predictor=predictor, activation=activation, scales=scales)
    gs, us, ds = (None, None, None) if scales is None else scales
    f = gate.shape[0]
    kind = dict(activation=activation, threshold=float(threshold))
    caps = capacities(f, smallest=smallest, ratio=ratio, dense_above=dense_above)

    rows_active = contract.row_masks(x, gate, gate_sign_bits, alpha, predictor=predictor,
                                     activation=activation, threshold_value=kind["threshold"],
                                     votes=contract.xla_votes, gate_scale=gs)
    idx, count = contract.compact(contract.union(jnp.any(rows_active, axis=0), union_axis))
    live = jnp.arange(f) < count
    a = jnp.where(live, activate(gate_stage(x, gate, idx, count, caps, gs), activation,
                                 kind["threshold"]), 0.0)
    a, rows, fired = contract.compact_fired(a, idx, union_axis)
    out = up_down_stage(x, a, up, down_t, rows, fired, caps, (us, ds))
    predicted = contract.total(jnp.sum(rows_active, dtype=jnp.int32), union_axis)
    counts = contract.counts(predicted, count, fired)
    return out.astype(contract.out_dtype(x, down_t)), counts
