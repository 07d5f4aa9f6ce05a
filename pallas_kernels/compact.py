"""Compacting a neuron mask into an index list: the shape the gathered kernels consume.

Every backend uses the jnp version: a cumsum gives each active neuron its slot and one scatter
writes the ids. On the CPU that is a few microseconds; on an H200 XLA makes several kernels of it
and the op took 24 us at F = 11008, as long as the gate and up rows of 10% of a 7b layer
(benchmarks/gpu_variants.py, 2026-11-29).

`compact_pallas` is the candidate replacement, not yet used: one program walks the mask in chunks
of `CHUNK` (3 at the 7b shape); a Triton scan within the chunk plus the running count gives the
slots, a masked scatter store writes the ids, and a second pass zeroes the slots from the count
on. One launch, ids ascending, deterministic. It passes its tests in interpret mode and compiles
for every GPU spec (compile report), but no GPU has run it yet: `benchmarks/gpu_check.sh` runs its
GPU test and times it against the jnp version; `compact` switches once it is faster there.
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import backend as bk
from pallas_kernels.backend import plgpu

CHUNK = 4096


def compact_kernel(active_ref, idx_ref, count_ref, *, chunk: int):
    """The one program. Refs: active_ref `[F]` int32 0/1; idx_ref `[F]` int32; count_ref `[1]`."""
    f = active_ref.shape[0]
    steps = pl.cdiv(f, chunk)

    def scatter(j, total):
        pos = j * chunk + jnp.arange(chunk)
        ok = pos < f
        on = plgpu.load(active_ref.at[pos], mask=ok, other=0)
        slot = total + jnp.cumsum(on) - 1
        # Lanes that store nothing aim past the end (interpret mode drops them).
        plgpu.store(idx_ref.at[jnp.where(on > 0, slot, f)], pos.astype(jnp.int32),
                    mask=ok & (on > 0))
        return total + jnp.sum(on)

    total = lax.fori_loop(0, steps, scatter, jnp.int32(0))

    def zero(j, carry):
        pos = j * chunk + jnp.arange(chunk)
        plgpu.store(idx_ref.at[pos], jnp.zeros((chunk,), jnp.int32),
                    mask=(pos < f) & (pos >= total))
        return carry

    lax.fori_loop(0, steps, zero, jnp.int32(0))
    plgpu.store(count_ref.at[jnp.arange(1)], jnp.full((1,), total, jnp.int32))


@functools.partial(jax.jit, static_argnames=["chunk", "num_warps", "interpret"])
def compact_pallas(active, *, chunk: int = CHUNK, num_warps: int = 8, interpret: bool = False):
    """Pallas (Triton) `compact` of a bool or 0/1 integer mask: (idx `[F]`, count `[]`)."""
    f = active.shape[0]
    chunk = min(chunk, pl.next_power_of_2(f))
    idx, count = pl.pallas_call(
        functools.partial(compact_kernel, chunk=chunk),
        grid=(1,),
        out_shape=[jax.ShapeDtypeStruct((f,), jnp.int32), jax.ShapeDtypeStruct((1,), jnp.int32)],
        compiler_params=plgpu.CompilerParams(num_warps=num_warps),
        interpret=interpret,
        name="compact",
    )(active.astype(jnp.int32))
    return idx, count[0]


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
      backend: one of `backend.BACKENDS` (all share the jnp version, see above).

    Returns:
      idx: `[F]` int32, the active ids in idx[:count] ascending, 0 after (a valid row, so
        gathers through idx never go out of bounds).
      count: `[]` int32 number of active neurons.
    """
    bk.resolve(backend)
    chex.assert_rank(active, 1)
    chex.assert_type(active, bool)
    return compact_xla(active)
