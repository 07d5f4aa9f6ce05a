"""The CPU's sparse MLP path: XLA loops over 64-row chunks of the active rows.

The two stages, with the candidates' ids from `contract.compact`:

    stage 1 (`gate_xla`): the gate over the candidates in a chunk loop (`CHUNK` rows, trip count
      ceil(count / CHUNK)), so work follows the count and no capacity can drop a neuron;
    `contract.compact_fired`: the second compaction, the candidates whose act(gate) fires;
    stage 2 (`up_down_xla`): one fused chunk loop that computes a chunk's up rows and adds its
      down rows (the [B, chunk] hidden block never leaves the loop).

Each stage runs densely above `DENSE_ABOVE` of F (`use_dense`). A second compaction rather than
masking inside one loop: an XLA gather reads every row it is given whatever the mask, so only a
shorter index list reads fewer bytes. Chunk and switch point were measured on the 2-core CPU with
benchmarks/switch_over.py (1b shape, float32, see benchmarks/RESULTS.md): small chunks keep each
gathered tile in cache; above about half of F the loop costs more than the dense matvec.

`layer_xla` is the whole layer op on this path; `two_stage_reference` (all F rows gathered through
idx, masked) is the reference its stages are tested against.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from pallas_kernels import contract, quant
from pallas_kernels.contract import activate, matmul_t

CHUNK = 64
DENSE_ABOVE = 0.5


def use_dense(count: jnp.ndarray, f: int, dense_above: float = DENSE_ABOVE) -> jnp.ndarray:
    """Whether a stage computes all `f` neurons densely for `count` live ones."""
    return count > int(dense_above * f)


def num_chunks(count: jnp.ndarray, chunk: int = CHUNK) -> jnp.ndarray:
    """Chunks of `chunk` compact positions that hold the first `count` (the loop's trip count)."""
    return (count + (chunk - 1)) // chunk


def _live(values: jnp.ndarray, count: jnp.ndarray) -> jnp.ndarray:
    """`values: [B, F]` with positions >= count set to 0."""
    return jnp.where(jnp.arange(values.shape[1]) < count, values, 0.0)


def gate_xla(x, gate, idx, count, *, dense_above: float = DENSE_ABOVE, scale=None):
    """Stage 1: `gate[idx[k]] . x` for k < count -> `[B, F]` float32 in compact order (garbage
    at positions >= count: the caller masks). `scale`: `[F]` float32 per-row scales of an int8
    gate (`quant.py`), or None."""
    b = x.shape[0]
    f = gate.shape[0]
    chunk = CHUNK
    idx_padded = jnp.pad(idx, (0, -f % chunk))

    def chunked(x, gate, count):
        def body(j, g):
            rows = lax.dynamic_slice_in_dim(idx_padded, j * chunk, chunk)
            # Tied to the rows, the weights are loop-variant: XLA CPU gathers bf16 from a float32
            # copy of the whole matrix, which it would otherwise hoist out of the loop.
            w, rows = lax.optimization_barrier((gate, rows))
            g_rows = quant.gathered_t(x, w, scale, rows)
            return lax.dynamic_update_slice_in_dim(g, g_rows, j * chunk, axis=1)

        g = jnp.zeros((b, f + (-f % chunk)), jnp.float32)
        return lax.fori_loop(0, num_chunks(count), body, g)[:, :f]

    def dense(x, gate, count):
        return jnp.take(quant.matmul_t(x, gate, scale), idx, axis=1)

    return lax.cond(use_dense(count, f, dense_above), dense, chunked, x, gate, count)


def up_down_xla(x, a, up, down_t, rows, fired, *, dense_above: float = DENSE_ABOVE,
                scales=(None, None)):
    """Stage 2: sum_{k < fired} (a[:, k] * (up[rows[k]] . x)) * down_t[rows[k]] -> `[B, D]` float32.

    `a: [B, F]` float32 activated gates in `rows` order, 0 at positions >= fired. `scales`: the
    `[F]` row scales of int8 up and down_t, or None each.
    """
    up_scale, down_scale = scales
    b = x.shape[0]
    f, d = up.shape
    chunk = CHUNK
    pad = -f % chunk
    a_padded = jnp.pad(a, ((0, 0), (0, pad)))
    rows_padded = jnp.pad(rows, (0, pad))

    def chunked(x, a, up, down_t):
        def body(j, acc):
            r = lax.dynamic_slice_in_dim(rows_padded, j * chunk, chunk)
            u, w, r = lax.optimization_barrier((up, down_t, r))  # as in `gate_xla`
            h = lax.dynamic_slice_in_dim(a_padded, j * chunk, chunk, axis=1) * quant.gathered_t(
                x, u, up_scale, r)
            return acc + quant.gathered(h, w, down_scale, r)

        return lax.fori_loop(0, num_chunks(fired), body, jnp.zeros((b, d), jnp.float32))

    def dense(x, a, up, down_t):
        # Natural order; positions >= fired hold 0 and point at row idx[0], so add, not set.
        a_nat = jnp.zeros((b, f), jnp.float32).at[:, rows].add(a)
        return quant.matmul(a_nat * quant.matmul_t(x, up, up_scale), down_t, down_scale)

    return lax.cond(use_dense(fired, f, dense_above), dense, chunked, x, a, up, down_t)


def sparse_mlp_xla(x, gate, up, down_t, idx, count, *, activation: str, threshold: float,
                   union_axis=None, dense_above: float = DENSE_ABOVE, scales=None):
    """Both stages over the candidates `idx[:count]`: (out `[B, D]` float32, fired `[]` int32,
    the candidates whose up and down rows were read, OR-ed over `union_axis`). `scales`: None, or
    the `[F]` row scales of int8 (gate, up, down_t)."""
    gs, us, ds = (None, None, None) if scales is None else scales
    a = _live(activate(gate_xla(x, gate, idx, count, dense_above=dense_above, scale=gs),
                       activation, threshold), count)
    a, rows, fired = contract.compact_fired(a, idx, union_axis)
    return up_down_xla(x, a, up, down_t, rows, fired, dense_above=dense_above,
                       scales=(us, ds)), fired


def two_stage_reference(x, gate, up, down_t, idx, count, *, activation: str, threshold: float):
    """All F rows gathered through idx, positions >= count masked (pure jnp, the truth)."""
    hp = lax.Precision.HIGHEST
    a = _live(activate(matmul_t(x, gate[idx], precision=hp), activation, threshold), count)
    h = a * matmul_t(x, up[idx], precision=hp)
    return matmul_t(h, down_t[idx].T, precision=hp), jnp.any(a != 0, axis=0)


def layer_xla(x, gate, up, down_t, gate_sign_bits, alpha, *, predictor: str, activation: str,
              threshold: float, union_axis=None, scales=None):
    """The layer op on this path: the XLA votes, `contract.compact`, then both chunk loops (int8
    rows gathered with their scales when `scales` is given)."""
    per_row = contract.row_masks(x, gate, gate_sign_bits, alpha, predictor=predictor,
                                 activation=activation, threshold_value=threshold,
                                 votes=contract.xla_votes,
                                 gate_scale=None if scales is None else scales[0])
    active = contract.union(jnp.any(per_row, axis=0), union_axis)
    idx, count = contract.compact(active)
    out, fired = sparse_mlp_xla(x, gate, up, down_t, idx, count, activation=activation,
                                threshold=threshold, union_axis=union_axis, scales=scales)
    predicted = contract.total(jnp.sum(per_row, dtype=jnp.int32), union_axis)
    return out, contract.counts(predicted, count, fired)
