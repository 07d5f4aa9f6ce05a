"""Which implementation an op runs, and the XLA path's static capacities.

Every op takes `backend` among BACKENDS:
- "reference": pure jnp, the truth the tests compare against (gathers all F rows).
- "xla": plain XLA with static capacities (see `capacities`); the CPU/TPU path and the fallback.
- "pallas": the Triton-backend Pallas kernel; off GPU it runs in interpret mode (slow, for tests).
- "auto": "pallas" on a GPU, "xla" elsewhere.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

BACKENDS = ("auto", "pallas", "xla", "reference")
# The XLA path gathers a static number of rows K: the smallest of these fractions of F that holds
# the active count, else it computes densely (exact). K is a multiple of this for aligned tiles.
CAPACITY_FRACTIONS = (16, 8, 4, 2)
CAPACITY_ALIGN = 8


def on_gpu() -> bool:
    """Whether the default JAX backend is a GPU (where Pallas Triton kernels compile)."""
    return jax.default_backend() == "gpu"


def resolve(backend: str) -> str:
    """Maps `backend` to one of "pallas", "xla", "reference" ("auto" picks by platform)."""
    if backend not in BACKENDS:
        raise ValueError(f"Unknown backend {backend!r}: use one of {', '.join(BACKENDS)}.")
    if backend == "auto":
        return "pallas" if on_gpu() else "xla"
    return backend


def interpret() -> bool:
    """Pallas kernels run in interpret mode (on the CPU) unless a GPU is there to compile them."""
    return not on_gpu()


def capacities(f: int) -> tuple[int, ...]:
    """Static row capacities for `f` neurons: F/16, F/8, F/4, F/2 rounded up, deduplicated, < F."""
    caps = set()
    for frac in CAPACITY_FRACTIONS:
        k = -(-f // frac)
        k = -(-k // CAPACITY_ALIGN) * CAPACITY_ALIGN
        if k < f:
            caps.add(k)
    return tuple(sorted(caps))


def capacity_branch(count: jnp.ndarray, caps: tuple[int, ...]) -> jnp.ndarray:
    """Index of the smallest capacity >= count; `len(caps)` (the dense branch) if none holds it.

    Chosen from `count` alone, so `sparse_gate_up` and `sparse_down` always take matching branches.
    """
    return jnp.sum(jnp.asarray(caps, jnp.int32) < count, dtype=jnp.int32)
