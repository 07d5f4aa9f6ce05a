"""What the TPU (Mosaic) kernels share: where they run, compiled or interpreted.

Compiled with Mosaic when JAX's default backend is a TPU, or inside `targeting_tpu()` (compiling
for a TPU topology on a machine without one, as `sparseinfer compile-report --tpu` does);
everywhere else in Pallas' TPU interpreter on the CPU (slow: for tests).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import jax

from pallas_kernels.backend import pltpu

_TARGET_TPU = False


def on_tpu() -> bool:
    """Whether the kernels are compiled for a TPU: JAX's default backend is one, or the caller
    is compiling for one ahead of time (`targeting_tpu`)."""
    return _TARGET_TPU or jax.default_backend() == "tpu"


@contextlib.contextmanager
def targeting_tpu() -> Iterator[None]:
    """Within: the Mosaic kernels are compiled, not interpreted, whatever the default backend
    (for compiling TPU programs without a TPU). Clears JAX's trace caches on entry and exit, so
    no trace made for the other target is reused."""
    global _TARGET_TPU
    jax.clear_caches()
    _TARGET_TPU = True
    try:
        yield
    finally:
        _TARGET_TPU = False
        jax.clear_caches()


def interpret_mode(interpret):
    """`pallas_call`'s interpret argument: True means Pallas' TPU interpreter (simulated VMEM,
    SMEM, DMAs and semaphores, uninitialised memory as NaN) with its default parameters."""
    return pltpu.InterpretParams() if interpret is True else interpret
