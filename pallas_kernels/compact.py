"""Compacting a neuron mask into an index list: the shape the XLA path's gathers consume.

A cumsum gives each active neuron its slot and one scatter writes the ids: a few microseconds on
the CPU. On an H200 XLA made several kernels of it, 24 us at F = 11008 (benchmarks/
gpu_variants.py, 2026-11-29): `sparse_mlp_layer`'s GPU kernels need no id list (each compacts its
own block in registers, `sparse_layer.py`).
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp

from pallas_kernels import backend as bk


def compact_xla(active):
    """The jnp `compact`: a cumsum for the slots, one scatter for the ids."""
    f = active.shape[0]
    slot = jnp.cumsum(active, dtype=jnp.int32) - 1
    # Inactive neurons aim past the end and are dropped; untouched slots keep their 0.
    slot = jnp.where(active, slot, f)
    idx = jnp.zeros((f,), jnp.int32).at[slot].set(jnp.arange(f, dtype=jnp.int32), mode="drop")
    return idx, jnp.sum(active, dtype=jnp.int32)


@functools.partial(jax.jit, static_argnames=["backend"])
def compact(active: jnp.ndarray, *, backend: str = "auto") -> tuple[jnp.ndarray, jnp.ndarray]:
    """Active neuron ids in ascending order, padded with 0, and their count.

    Args:
      active: `[F]` bool mask.
      backend: one of `backend.BACKENDS` (all share the jnp version).

    Returns:
      idx: `[F]` int32, the active ids in idx[:count] ascending, 0 after (a valid row, so
        gathers through idx never go out of bounds).
      count: `[]` int32 number of active neurons.
    """
    bk.resolve(backend)
    chex.assert_rank(active, 1)
    chex.assert_type(active, bool)
    return compact_xla(active)
