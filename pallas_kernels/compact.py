"""Compacting a neuron mask into an index list: the shape the gathered kernels consume.

One jnp implementation serves every backend: a cumsum gives each active neuron its slot and one
scatter writes the ids (F ~ 10^4 booleans, a few microseconds that XLA fuses next to the
predictor). A Pallas version would need a cross-program prefix sum (a pass per block plus a carry
pass) to save nothing measurable, so the `backend` argument is only validated.
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp

from pallas_kernels import backend as bk


@functools.partial(jax.jit, static_argnames=["backend"])
def compact(active: jnp.ndarray, *, backend: str = "auto") -> tuple[jnp.ndarray, jnp.ndarray]:
    """Active neuron ids in ascending order, padded with 0, and their count.

    Args:
      active: `[F]` bool mask.
      backend: one of `backend.BACKENDS` (all share this implementation).

    Returns:
      idx: `[F]` int32, the active ids in idx[:count] ascending, 0 after (a valid row, so
        gathers through idx never go out of bounds).
      count: `[]` int32 number of active neurons.
    """
    bk.resolve(backend)
    chex.assert_rank(active, 1)
    chex.assert_type(active, bool)
    f = active.shape[0]
    slot = jnp.cumsum(active, dtype=jnp.int32) - 1
    # Inactive neurons aim past the end and are dropped; untouched slots keep their 0.
    slot = jnp.where(active, slot, f)
    idx = jnp.zeros((f,), jnp.int32).at[slot].set(jnp.arange(f, dtype=jnp.int32), mode="drop")
    return idx, jnp.sum(active, dtype=jnp.int32)
