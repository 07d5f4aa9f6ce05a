"""Which implementation an op runs, and how the XLA path walks the active rows.

Every op takes `backend` among BACKENDS:
- "reference": pure jnp, the truth the tests compare against (gathers all F rows).
- "xla": plain XLA, a loop over chunks of the active rows or dense (see `use_dense`); the CPU/TPU
  path and the fallback.
- "pallas": the Triton-backend Pallas kernel; off GPU it runs in interpret mode (slow, for tests).
- "auto": "pallas" on a GPU, "xla" elsewhere.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Iterator

import jax
import jax.numpy as jnp

BACKENDS = ("auto", "pallas", "xla", "reference")
# The XLA path walks the active rows in chunks of CHUNK (a loop whose trip count is the real
# count / CHUNK, so work follows the count and no capacity can drop a neuron), and computes densely
# when more than DENSE_ABOVE of the neurons are active. Both measured on the 2-core CPU with
# benchmarks/switch_over.py (1b shape, float32, see benchmarks/RESULTS.md): small chunks keep each
# gathered tile in cache; above about half of F the loop costs more than the dense matvec.
CHUNK = 64
DENSE_ABOVE = 0.5


_TARGET_GPU = False


def nvidia_driver_present() -> bool:
    """Whether this machine has an NVIDIA driver (its control device node)."""
    return os.path.exists("/dev/nvidiactl")


# With a CUDA plugin installed (the test extra installs one, for `sparseinfer compile-report`) on a
# machine without an NVIDIA driver, jax 0.10 fails to start unless its platform is set: default it
# to the CPU there, unless the user chose one (JAX_PLATFORMS). The plugin still compiles for GPUs.
if (not jax.config.jax_platforms and not nvidia_driver_present()
        and importlib.util.find_spec("jax_plugins") is not None):
    jax.config.update("jax_platforms", "cpu")


def on_gpu() -> bool:
    """Whether kernels are built for a GPU: the default JAX backend is one (where Pallas Triton
    kernels compile), or the caller is compiling for one ahead of time (`targeting_gpu`)."""
    return _TARGET_GPU or jax.default_backend() == "gpu"


def abstract_gpu_mesh(device_kind: str):
    """A one-device abstract mesh of a CUDA GPU of `device_kind` (e.g. "NVIDIA H100 80GB HBM3")
    for `targeting_gpu`; None on jax < 0.11, which has no abstract devices and needs none."""
    if not hasattr(jax.sharding, "AbstractDevice"):
        return None
    device = jax.sharding.AbstractDevice(device_kind=device_kind, num_cores=None, platform="cuda")
    return jax.sharding.AbstractMesh((1,), ("x",), axis_types=(jax.sharding.AxisType.Explicit,),
                                     abstract_device=device)


@contextlib.contextmanager
def targeting_gpu(mesh=None) -> Iterator[None]:
    """Within: "auto" means "pallas" and Pallas kernels are real Triton kernels, not interpreted,
    whatever the default backend: for compiling GPU programs on a machine without a GPU.

    Pallas reads the target's compute capability from its device kind: jax >= 0.11 takes it from
    the abstract device of the abstract mesh in use, so pass `mesh` (`abstract_gpu_mesh`, or the
    `abstract_mesh` of a mesh of compile-only GPU devices); older jax needs none. Clears JAX's
    trace caches on entry and exit, so no trace made for the other target is reused.
    """
    global _TARGET_GPU
    use_mesh = contextlib.nullcontext()
    if mesh is not None and hasattr(jax.sharding, "AbstractDevice"):
        use_mesh = jax.sharding.use_abstract_mesh(mesh)
    jax.clear_caches()
    _TARGET_GPU = True
    try:
        with use_mesh:
            yield
    finally:
        _TARGET_GPU = False
        jax.clear_caches()


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


def use_dense(count: jnp.ndarray, f: int, dense_above: float = DENSE_ABOVE) -> jnp.ndarray:
    """Whether the XLA path computes all `f` neurons densely for `count` active ones.

    Chosen from `count` alone, so `sparse_gate_up` and `sparse_down` always take matching paths.
    """
    return count > int(dense_above * f)


def num_chunks(count: jnp.ndarray, chunk: int = CHUNK) -> jnp.ndarray:
    """Chunks of `chunk` compact positions that hold the first `count` (the loop's trip count)."""
    return (count + (chunk - 1)) // chunk
