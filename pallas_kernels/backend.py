"""Which implementation runs: the device-aware `auto` choice, and what this jax can lower.

Paths, the values of `backend` besides "auto" (BACKENDS):
- "pallas": Pallas Triton kernels. A CUDA GPU of compute capability >= 8.0 (XLA compiles Triton
  for Ampere and newer only) with a jax that still has Pallas' Triton backend; off GPU they run in
  interpret mode (slow, for tests).
- "mosaic": Pallas TPU (Mosaic) kernels, on a TPU (`tpu/`).
- "portable": plain XLA at static bucketed shapes (`xla/portable.py`), fast on any XLA device: a
  GPU that Pallas Triton cannot serve, or a TPU without Pallas' TPU backend.
- "xla": plain XLA, a loop over chunks of the active rows or dense (`xla/chunk_loop.py`): the
  CPU's path (`CPU_PATH`).
- "reference": pure jnp, the truth the tests compare against.

"auto" picks by device (`choose`): pallas on a GPU, mosaic on a TPU, `CPU_PATH` on the CPU, and
portable where the faster path cannot run there; an explicit "pallas" or "mosaic" on a device
that cannot run it falls back the same way. Never a crash where a faster path is missing: each
fallback is said once (a RuntimeWarning). `describe` is the one-line account for users.
Compiling offline for a GPU (`targeting_gpu`), the target's compute capability decides.

The predictors alone (`layer.sign_predict`, `layer.signmag_predict`) have "pallas", "xla" and
"reference" faces: `resolve` maps the choice onto them (every other path runs their XLA face).

What this jax has: Pallas' Triton and TPU backends are found through their public modules
(`jax.experimental.pallas.triton`, `.tpu`: `plgpu`, `pltpu` here, None where they do not import).
The few private jax modules the package reads (to verify Triton IR, to name an offline GPU) are
looked up here alone, by `private_module`, so a jax release that moves one breaks one place.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import os
import warnings
from collections.abc import Iterator

import jax

try:  # Pallas' Triton backend: a jax without it still imports the kernels, and never runs them
    from jax.experimental.pallas import triton as plgpu
except ImportError:
    plgpu = None
try:  # Pallas' TPU (Mosaic) backend, likewise
    from jax.experimental.pallas import tpu as pltpu
except ImportError:
    pltpu = None

# The private jax modules the package reads, each where it is used: Triton IR for
# `gpu/triton_check.py`, the MLIR bindings that parse it, and Pallas' table of GPU names (jax >=
# 0.11) for `_named_for_pallas`.
TRITON_LOWERING = "jax._src.pallas.triton.lowering"
MLIR = "jax._src.lib.mlir"
GPU_INFO = "jax._src.pallas.triton.gpu_info"

BACKENDS = ("auto", "pallas", "mosaic", "portable", "xla", "reference")
# XLA compiles Triton kernels for compute capability 8.0 and up only ("Triton support is only
# enabled for Ampere GPUs (compute capability 8.0) and up", compiling for a T4's sm_75).
TRITON_MIN_CC = (8, 0)
# The CPU's sparse path: on the 2-core CPU the portable path took 1.8x the chunk loop's time
# (float32; 2.0x bfloat16), paired, cold caches, 1b shape, 10 % active (benchmarks/RESULTS.md,
# benchmarks/portable_paired.py): a gather of a whole bucket leaves the cache, 64 rows do not.
CPU_PATH = "xla"
_PATH_WORDS = {
    "pallas": "the Pallas Triton kernels",
    "mosaic": "the Pallas TPU (Mosaic) kernels",
    "portable": "the portable XLA path",
    "xla": "the XLA chunk loop",
    "reference": "the jnp reference",
}


@dataclasses.dataclass(frozen=True)
class Device:
    """What the choice depends on: the platform ("cpu", "cuda", "gpu" for a GPU that is not
    CUDA's, "tpu", ...), the device kind, and a CUDA GPU's compute capability (None elsewhere, or
    when a compile target does not say)."""

    platform: str
    kind: str
    compute_capability: tuple[int, int] | None = None

    def __str__(self) -> str:
        if self.platform in ("cpu", "tpu"):
            return self.kind if self.platform == "tpu" else "CPU"
        cc = self.compute_capability
        return f"GPU {self.kind}" + (f" (sm_{cc[0]}{cc[1]})" if cc else "")


@dataclasses.dataclass(frozen=True)
class Choice:
    """The path a sparse MLP layer runs on `device`, and why (`fallback`: a faster path exists for
    this kind of device but cannot run here)."""

    path: str
    device: Device
    why: str
    fallback: bool = False

    def line(self) -> str:
        """One line for users: device, path, why."""
        return f"{self.device}: sparse MLP runs {_PATH_WORDS[self.path]} ({self.why})"


# The GPU being compiled for ahead of time (`targeting_gpu`), else None: the local device decides.
_TARGET: Device | None = None
_SAID: set[str] = set()


def nvidia_driver_present() -> bool:
    """Whether this machine has an NVIDIA driver (its control device node)."""
    return os.path.exists("/dev/nvidiactl")


# With a CUDA plugin installed (the test extra installs one, for `sparseinfer compile-report`) on a
# machine without an NVIDIA driver, jax 0.10 fails to start unless its platform is set: default it
# to the CPU there, unless the user chose one (JAX_PLATFORMS). The plugin still compiles for GPUs.
if (not jax.config.jax_platforms and not nvidia_driver_present()
        and importlib.util.find_spec("jax_plugins") is not None):
    jax.config.update("jax_platforms", "cpu")


def private_module(name: str):
    """The private jax module `name` (one of the names above), or None where this jax has none."""
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def has_triton() -> bool:
    """Whether the installed jax has Pallas' Triton backend (the lowering "pallas" needs)."""
    return plgpu is not None


def has_mosaic_tpu() -> bool:
    """Whether the installed jax has Pallas' TPU (Mosaic) backend (the lowering "mosaic" needs)."""
    return pltpu is not None


def parse_compute_capability(value) -> tuple[int, int] | None:
    """"8.9" (what a CUDA device's `compute_capability` holds) -> (8, 9); None for anything else
    (a ROCm GPU's "gfx90a", a missing value)."""
    try:
        major, minor = str(value).split(".")
        return int(major), int(minor)
    except ValueError:
        return None


def local_device() -> Device:
    """JAX's default device, as the choice sees it."""
    d = jax.devices()[0]
    if d.platform != "gpu":
        return Device(d.platform, d.device_kind)
    cc = parse_compute_capability(getattr(d, "compute_capability", None))
    return Device("cuda" if cc else "gpu", d.device_kind, cc)


def target() -> Device:
    """The device programs are built for: the GPU of `targeting_gpu`, else the local one."""
    return _TARGET if _TARGET is not None else local_device()


def on_gpu() -> bool:
    """Whether kernels are built for a GPU: the default JAX backend is one (where Pallas Triton
    kernels compile), or the caller is compiling for one ahead of time (`targeting_gpu`)."""
    return _TARGET is not None or jax.default_backend() == "gpu"


def unavailable(path: str, device: Device) -> str | None:
    """Why `path` cannot run on `device` (None when it can; Pallas kernels run interpreted on the
    CPU)."""
    if path == "pallas" and device.platform != "cpu":
        cc = device.compute_capability
        if device.platform != "cuda":
            return "Pallas Triton kernels run on CUDA GPUs only"
        if not has_triton():
            return "this jax has no Pallas Triton backend"
        if cc is not None and cc < TRITON_MIN_CC:
            return (f"Pallas Triton needs compute capability {TRITON_MIN_CC[0]}.{TRITON_MIN_CC[1]}"
                    f" or newer, this GPU has {cc[0]}.{cc[1]}")
    if path == "mosaic" and device.platform != "cpu":
        if device.platform != "tpu":
            return "Pallas TPU kernels run on TPUs only"
        if not has_mosaic_tpu():
            return "this jax has no Pallas TPU backend"
    return None


def choose(backend: str = "auto") -> Choice:
    """The path a sparse MLP layer runs for `backend` (one of BACKENDS) on the target device.

    "auto": pallas on a GPU, mosaic on a TPU, `CPU_PATH` on the CPU, portable on other devices.
    Where the path asked for (or picked) cannot run on the device, portable, said once.
    """
    if backend not in BACKENDS:
        raise ValueError(f"Unknown backend {backend!r}: use one of {', '.join(BACKENDS)}.")
    device = target()
    if backend == "auto":
        path = {"cuda": "pallas", "gpu": "pallas", "tpu": "mosaic",
                "cpu": CPU_PATH}.get(device.platform, "portable")
        why = "chosen by auto"
    else:
        path, why = backend, "asked for"
        if path in ("pallas", "mosaic") and device.platform == "cpu":
            why = "asked for; interpreted on the CPU, slow, for tests"
    problem = unavailable(path, device)
    if problem is None:
        return Choice(path, device, why)
    choice = Choice("portable", device, problem, fallback=True)
    say_once(choice.line())
    return choice


def say_once(line: str) -> None:
    """A RuntimeWarning of `line`, the first time this process meets it: how every fallback is
    said."""
    if line not in _SAID:
        _SAID.add(line)
        warnings.warn(line, RuntimeWarning, stacklevel=3)


def describe(backend: str = "auto") -> str:
    """One line saying which device was found, which path sparse mode takes there, and why (for
    `generate --compare` and the notebook)."""
    return choose(backend).line()


def abstract_gpu_mesh(device_kind: str):
    """A one-device abstract mesh of a CUDA GPU of `device_kind` (e.g. "NVIDIA H100 80GB HBM3")
    for `targeting_gpu`; None on jax < 0.11, which has no abstract devices and needs none."""
    if not hasattr(jax.sharding, "AbstractDevice"):
        return None
    device = jax.sharding.AbstractDevice(device_kind=device_kind, num_cores=None, platform="cuda")
    return jax.sharding.AbstractMesh((1,), ("x",), axis_types=(jax.sharding.AxisType.Explicit,),
                                     abstract_device=device)


def _named_for_pallas(mesh, compute_capability: tuple[int, int] | None):
    """`mesh` with a device kind Pallas can look up. Pallas Triton (jax >= 0.11) finds an abstract
    GPU's compute capability by its name in a table (`gpu_info`), and fails for a name not in it
    (an "NVIDIA RTX A6000" spec, or a user's own); such a target is renamed to a listed GPU of the
    same compute capability, the only thing Pallas reads from it. Unchanged otherwise."""
    device = getattr(mesh, "abstract_device", None)
    gpu_info = private_module(GPU_INFO)
    if gpu_info is None:  # jax < 0.11 looks up nothing
        return mesh
    if device is None or compute_capability is None or gpu_info.gpu_version_from_device_kind(
            device.device_kind) is not None:
        return mesh
    want = compute_capability[0] * 10 + compute_capability[1]
    for version in gpu_info.GpuVersion:
        try:
            found = gpu_info.get_gpu_info_from_version(version).compute_capability
        except ValueError:
            continue
        if found == want:
            alias = dataclasses.replace(device, device_kind=version.value)
            return jax.sharding.AbstractMesh(mesh.axis_sizes, mesh.axis_names,
                                             axis_types=mesh.axis_types, abstract_device=alias)
    return mesh


@contextlib.contextmanager
def targeting_gpu(mesh=None, *, compute_capability: tuple[int, int] | None = None,
                  device_kind: str | None = None) -> Iterator[None]:
    """Within: programs are built for a CUDA GPU, whatever the default backend: for compiling GPU
    programs on a machine without one. "auto" picks for that GPU (`choose`), and Pallas kernels
    are real Triton kernels, not interpreted.

    Args:
      mesh: the target's one-device abstract mesh (`abstract_gpu_mesh`, or the `abstract_mesh` of a
        mesh of compile-only GPU devices): Pallas on jax >= 0.11 reads the target's compute
        capability from its device kind; older jax needs none.
      compute_capability: the target's, e.g. (7, 5) for a T4: decides whether "pallas" can run
        (None: taken to be one Pallas Triton supports).
      device_kind: the target's name for `describe` (default: the mesh's device kind).

    Clears JAX's trace caches on entry and exit, so no trace made for the other target is reused.
    """
    global _TARGET
    if device_kind is None:
        abstract = getattr(mesh, "abstract_device", None)
        device_kind = abstract.device_kind if abstract is not None else "CUDA GPU"
    use_mesh = contextlib.nullcontext()
    if mesh is not None and hasattr(jax.sharding, "AbstractDevice"):
        use_mesh = jax.sharding.use_abstract_mesh(_named_for_pallas(mesh, compute_capability))
    jax.clear_caches()
    _TARGET = Device("cuda", device_kind, compute_capability)
    try:
        with use_mesh:
            yield
    finally:
        _TARGET = None
        jax.clear_caches()


def resolve(backend: str) -> str:
    """Maps `backend` to the per-op face among "pallas", "xla", "reference" (`choose` picks the
    path; every path but pallas and reference runs the ops' XLA face)."""
    path = choose(backend).path
    return path if path in ("pallas", "reference") else "xla"


def interpret() -> bool:
    """Pallas kernels run in interpret mode (on the CPU) unless a GPU is there to compile them."""
    return not on_gpu()
