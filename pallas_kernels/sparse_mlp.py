"""The whole sparse MLP in two stages: gate over the candidates, then up and down over the fired.

Input is the predictor's compacted candidate set (`compact.py`): `idx: [F]` int32 neuron ids, the
first `count` live. Stage 1 computes the gate pre-activation of every candidate; a candidate
*fires* when act(gate . x) != 0 for at least one row of the batch. Stage 2 reads the `up` and
`down_t` rows of the fired candidates only. The output equals the one-stage
`sparse_down(sparse_gate_up(...))` (a candidate that does not fire contributes act(g) * u = 0), up
to float32 summation order; what changes is the bytes read per token:

    predictor + gate rows of the candidates + up and down rows of the fired ones

instead of predictor + 3 x candidates.

Backends:
- "reference": all F rows gathered through idx, masked (pure jnp, the truth).
- "xla": the gate over the candidates in a chunk loop (`bk.CHUNK` rows, trip count from `count`),
  a second compaction of the fired positions, then one fused chunk loop that computes the up rows
  of a chunk and adds their down rows (the [B, chunk] hidden block never leaves the loop). Each
  stage runs densely above `bk.DENSE_ABOVE` of F (`bk.use_dense`). A second compaction rather than
  masking inside one loop: an XLA gather reads every row it is given whatever the mask, so only
  a shorter index list reads fewer bytes.
- "pallas": `sparse_gate_up` then `sparse_down` (their kernels skip the up loads of rows whose gate
  does not fire, and the down loads of zero rows of h); fired is counted from h != 0 (it differs
  from act(g) != 0 only where an up product is exactly 0).
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels import backend as bk
from pallas_kernels.compact import compact
from pallas_kernels.sparse_down import matmul, sparse_down
from pallas_kernels.sparse_gate_up import ACTIVATIONS, activate, matmul_t, sparse_gate_up


def _live(values: jnp.ndarray, count: jnp.ndarray) -> jnp.ndarray:
    """`values: [B, F]` with positions >= count set to 0."""
    return jnp.where(jnp.arange(values.shape[1]) < count, values, 0.0)


def gate_xla(x, gate, idx, count, *, dense_above: float = bk.DENSE_ABOVE):
    """Stage 1: `gate[idx[k]] . x` for k < count -> `[B, F]` float32 in compact order (garbage
    at positions >= count: the caller masks)."""
    b = x.shape[0]
    f = gate.shape[0]
    chunk = bk.CHUNK
    idx_padded = jnp.pad(idx, (0, -f % chunk))

    def chunked(x, gate, count):
        def body(j, g):
            rows = lax.dynamic_slice_in_dim(idx_padded, j * chunk, chunk)
            # Tied to the rows, the weights are loop-variant: XLA CPU gathers bf16 from a float32
            # copy of the whole matrix, which it would otherwise hoist out of the loop.
            w, rows = lax.optimization_barrier((gate, rows))
            return lax.dynamic_update_slice_in_dim(g, matmul_t(x, w[rows]), j * chunk, axis=1)

        g = jnp.zeros((b, f + (-f % chunk)), jnp.float32)
        return lax.fori_loop(0, bk.num_chunks(count), body, g)[:, :f]

    def dense(x, gate, count):
        return jnp.take(matmul_t(x, gate), idx, axis=1)

    return lax.cond(bk.use_dense(count, f, dense_above), dense, chunked, x, gate, count)


def up_down_xla(x, a, up, down_t, rows, fired, *, dense_above: float = bk.DENSE_ABOVE):
    """Stage 2: sum_{k < fired} (a[:, k] * (up[rows[k]] . x)) * down_t[rows[k]] -> `[B, D]` float32.

    `a: [B, F]` float32 activated gates in `rows` order, 0 at positions >= fired.
    """
    b = x.shape[0]
    f, d = up.shape
    chunk = bk.CHUNK
    pad = -f % chunk
    a_padded = jnp.pad(a, ((0, 0), (0, pad)))
    rows_padded = jnp.pad(rows, (0, pad))

    def chunked(x, a, up, down_t):
        def body(j, acc):
            r = lax.dynamic_slice_in_dim(rows_padded, j * chunk, chunk)
            u, w, r = lax.optimization_barrier((up, down_t, r))  # as in `gate_xla`
            h = lax.dynamic_slice_in_dim(a_padded, j * chunk, chunk, axis=1) * matmul_t(x, u[r])
            return acc + matmul(h, w[r])

        return lax.fori_loop(0, bk.num_chunks(fired), body, jnp.zeros((b, d), jnp.float32))

    def dense(x, a, up, down_t):
        # Natural order; positions >= fired hold 0 and point at row idx[0], so add, not set.
        a_nat = jnp.zeros((b, f), jnp.float32).at[:, rows].add(a)
        return matmul(a_nat * matmul_t(x, up), down_t)

    return lax.cond(bk.use_dense(fired, f, dense_above), dense, chunked, x, a, up, down_t)


def sparse_mlp_xla(x, gate, up, down_t, idx, count, *, activation: str, threshold: float,
                   dense_above: float = bk.DENSE_ABOVE):
    """Two-stage XLA path: (out `[B, D]` float32, fired `[F]` bool)."""
    f = gate.shape[0]
    a = _live(activate(gate_xla(x, gate, idx, count, dense_above=dense_above), activation,
                       threshold), count)
    fired = jnp.any(a != 0, axis=0)
    pos, n = compact(fired, backend="xla")  # the second compaction: fired positions, ascending
    a = jnp.where(jnp.arange(f) < n, jnp.take(a, pos, axis=1), 0.0)
    return up_down_xla(x, a, up, down_t, idx[pos], n, dense_above=dense_above), fired


def sparse_mlp_pallas(x, gate, up, down_t, idx, count, *, activation: str, threshold: float):
    """`sparse_gate_up` then `sparse_down` on the Pallas kernels: (out, fired from h != 0)."""
    h = sparse_gate_up(x, gate, up, idx, count, activation=activation, threshold=threshold,
                       backend="pallas")
    return sparse_down(h, down_t, idx, count, backend="pallas"), jnp.any(h != 0, axis=0)


def sparse_mlp_reference(x, gate, up, down_t, idx, count, *, activation: str, threshold: float):
    """All F rows gathered through idx, positions >= count masked (pure jnp, the truth)."""
    hp = lax.Precision.HIGHEST
    a = _live(activate(matmul_t(x, gate[idx], precision=hp), activation, threshold), count)
    h = a * matmul_t(x, up[idx], precision=hp)
    return matmul_t(h, down_t[idx].T, precision=hp), jnp.any(a != 0, axis=0)


@functools.partial(jax.jit, static_argnames=["activation", "threshold", "backend"])
def sparse_mlp(x: jnp.ndarray, gate: jnp.ndarray, up: jnp.ndarray, down_t: jnp.ndarray,
               idx: jnp.ndarray, count: jnp.ndarray, *, activation: str = "relu",
               threshold: float = 0.0, backend: str = "auto") -> tuple[jnp.ndarray, jnp.ndarray]:
    """sum over candidates k < count of act(gate[idx[k]] . x) * (up[idx[k]] . x) * down_t[idx[k]].

    Args:
      x: `[B, D]` bfloat16 or float32 MLP input.
      gate, up, down_t: `[F, D]` weights, one row per neuron (down_t is W_down transposed).
      idx: `[F]` int32 candidate neuron ids in idx[:count], 0 after (from `compact`).
      count: `[]` int32 number of candidates.
      activation: "relu" or "fatrelu" (static).
      threshold: FATReLU threshold (static; ignored by "relu").
      backend: one of `backend.BACKENDS`.

    Returns:
      out: `[B, D]` in down_t's dtype (accumulated in float32).
      fired: `[F]` bool in compact order: candidate k's activated gate is non-zero for at least
        one row (so its up and down rows are read); False at positions >= count. A mask, not a
        count, so a caller that splits the batch can take the union over its shards.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"Sparse MLP activation {activation!r} is not ReLU-family: use one of "
                         f"{', '.join(ACTIVATIONS)}.")
    f, d = gate.shape
    count = jnp.asarray(count, jnp.int32)
    chex.assert_rank([x, idx, count], [2, 1, 0])
    chex.assert_shape([x, up, down_t, idx], [(None, d), (f, d), (f, d), (f,)])
    chex.assert_type(idx, jnp.int32)
    kind = dict(activation=activation, threshold=float(threshold))
    match bk.resolve(backend):
        case "pallas":
            return sparse_mlp_pallas(x, gate, up, down_t, idx, count, **kind)
        case "xla":
            out, fired = sparse_mlp_xla(x, gate, up, down_t, idx, count, **kind)
        case _:
            out, fired = sparse_mlp_reference(x, gate, up, down_t, idx, count, **kind)
    return out.astype(down_t.dtype), fired
