"""`auto` chooses what the device can run: each device kind faked (no real device needed), a jax
without Pallas' Triton backend (faked, and for real in a child process that cannot import it),
and offline GPU targets whose compute capability decides."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import warnings

import pytest

from pallas_kernels import backend as bk
from pallas_kernels.backend import Device

CPU = Device("cpu", "cpu")
H100 = Device("cuda", "NVIDIA H100 80GB HBM3", (9, 0))
A100 = Device("cuda", "NVIDIA A100-SXM4-80GB", (8, 0))
L4 = Device("cuda", "NVIDIA L4", (8, 9))
T4 = Device("cuda", "Tesla T4", (7, 5))
ROCM = Device("gpu", "AMD Instinct MI250X")
TPU = Device("tpu", "TPU v5 lite")

# (device, backend asked for, jax has Triton, jax has Pallas TPU, path, falls back)
ROWS = [
    (CPU, "auto", True, True, bk.CPU_PATH, False),
    (CPU, "pallas", True, True, "pallas", False),  # interpreted: the kernel tests' mode
    (CPU, "portable", True, True, "portable", False),
    (H100, "auto", True, True, "pallas", False),
    (A100, "auto", True, True, "pallas", False),
    (L4, "auto", True, True, "pallas", False),
    (T4, "auto", True, True, "portable", True),
    (T4, "pallas", True, True, "portable", True),
    (T4, "xla", True, True, "xla", False),
    (H100, "auto", False, True, "portable", True),
    (H100, "mosaic", True, True, "portable", True),
    (ROCM, "auto", True, True, "portable", True),
    (TPU, "auto", True, True, "mosaic", False),
    (TPU, "auto", True, False, "portable", True),
    (TPU, "pallas", True, True, "portable", True),
    (TPU, "reference", True, True, "reference", False),
]


@pytest.fixture
def fake(monkeypatch):
    """Fakes the local device and what the installed jax has; each test starts with nothing said."""
    monkeypatch.setattr(bk, "_SAID", set())

    def set_to(device: Device, triton: bool = True, mosaic: bool = True) -> None:
        monkeypatch.setattr(bk, "local_device", lambda: device)
        monkeypatch.setattr(bk, "has_triton", lambda: triton)
        monkeypatch.setattr(bk, "has_mosaic_tpu", lambda: mosaic)

    return set_to


@pytest.mark.parametrize("device,backend,triton,mosaic,path,fallback", ROWS)
def test_choice_per_device(fake, device, backend, triton, mosaic, path, fallback):
    fake(device, triton, mosaic)
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        choice = bk.choose(backend)
    assert (choice.path, choice.fallback, choice.device) == (path, fallback, device)
    # A fallback is said (once per process: see the next test), a designed choice is not.
    assert [str(w.message) for w in said] == ([choice.line()] if fallback else [])
    # The per-op functions run their Pallas face only where the layer runs Pallas.
    assert bk.resolve(backend) == (path if path in ("pallas", "reference") else "xla")


def test_fallback_said_once_with_the_reason(fake):
    fake(T4)
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        lines = {bk.describe() for _ in range(3)} | {bk.choose("pallas").line()}
        bk.resolve("auto")
    assert len(said) == 1 and issubclass(said[0].category, RuntimeWarning)
    (line,) = lines
    assert line == str(said[0].message)
    assert line.startswith("GPU Tesla T4 (sm_75): sparse MLP runs the portable XLA path (")
    assert "compute capability 8.0" in line and "7.5" in line


@pytest.mark.parametrize("device,words", [
    (CPU, "CPU: sparse MLP runs the XLA chunk loop"),
    (H100, "GPU NVIDIA H100 80GB HBM3 (sm_90): sparse MLP runs the Pallas Triton kernels"),
    (TPU, "TPU v5 lite: sparse MLP runs the Pallas TPU (Mosaic) kernels"),
])
def test_describe_says_device_path_and_why(fake, device, words):
    fake(device)
    assert bk.describe() == f"{words} (chosen by auto)"
    assert bk.describe("portable").endswith("the portable XLA path (asked for)")
    interpreted = device == CPU  # Pallas asked for on the CPU runs, in interpret mode: say so
    with warnings.catch_warnings():  # a TPU falls back from pallas, and warns
        warnings.simplefilter("ignore", RuntimeWarning)
        assert ("interpreted on the CPU" in bk.describe("pallas")) is interpreted


def test_unknown_backend():
    with pytest.raises(ValueError, match="Unknown backend 'cuda'"):
        bk.choose("cuda")


@pytest.mark.parametrize("cc,path", [((7, 5), "portable"), ((8, 9), "pallas"), (None, "pallas")])
def test_offline_target_compute_capability_decides(fake, cc, path):
    fake(CPU)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with bk.targeting_gpu(compute_capability=cc, device_kind="Tesla T4"):
            assert bk.on_gpu() and bk.choose("auto").path == path
            assert bk.interpret() is False
    assert bk.choose("auto").path == bk.CPU_PATH and bk.target() == CPU


# (device kind of an offline target, its compute capability, what Pallas Triton reads)
PALLAS_NAMES = [
    ("NVIDIA H100 80GB HBM3", (9, 0), 90),  # in Pallas' table: as it is
    ("NVIDIA RTX A6000", (8, 6), 86),  # not in it: read by its compute capability
    ("Our Own GPU", (8, 0), 80),
]


@pytest.mark.parametrize("kind, cc, read", PALLAS_NAMES, ids=[k for k, _, _ in PALLAS_NAMES])
def test_offline_target_pallas_does_not_list_is_read_by_its_compute_capability(kind, cc, read):
    """Pallas Triton (jax >= 0.11) looks an abstract GPU up by name and failed for a spec's name
    it does not list, so `compile-report --gpu a6000` compiled no kernel."""
    gpu_info = pytest.importorskip("jax._src.pallas.triton.gpu_info")
    with bk.targeting_gpu(bk.abstract_gpu_mesh(kind), compute_capability=cc):
        assert gpu_info.get_gpu_info().compute_capability == read
        assert bk.target() == Device("cuda", kind, cc)


def test_local_device_reads_the_compute_capability(monkeypatch):
    class Fake:
        platform, device_kind, compute_capability = "gpu", "Tesla T4", "7.5"

    monkeypatch.setattr(bk.jax, "devices", lambda: [Fake()])
    assert bk.local_device() == T4
    Fake.compute_capability, Fake.device_kind = "gfx90a", ROCM.kind
    assert bk.local_device() == ROCM


# Run as a child: Pallas' Triton backend cannot be imported, as in a jax that dropped it.
NO_TRITON = """
import importlib.abc, sys
class Gone(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.startswith(("jax._src.pallas.triton", "jax.experimental.pallas.triton")):
            raise ImportError(f"no {name} in this jax")
sys.meta_path.insert(0, Gone())
import warnings
import jax.numpy as jnp, numpy as np
from pallas_kernels import backend as bk, pack_sign_bits_numpy
from pallas_kernels.xla.portable import sparse_mlp_layer_portable
bk.local_device = lambda: bk.Device("cuda", "NVIDIA H100 80GB HBM3", (9, 0))
with warnings.catch_warnings(record=True) as said:
    warnings.simplefilter("always")
    print(bk.choose("auto").path, bk.resolve("pallas"), len(said))
w = np.random.default_rng(0).standard_normal((3, 40, 32)).astype(np.float32)
out, counts = sparse_mlp_layer_portable(jnp.ones((1, 32)), *map(jnp.asarray, w),
                                        jnp.asarray(pack_sign_bits_numpy(w[0])), jnp.float32(1.0))
print(out.shape, bool(jnp.isfinite(out).all()))
"""


def test_jax_without_triton_imports_and_falls_back():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "JAX_PLATFORMS": "cpu"}
    run = subprocess.run([sys.executable, "-c", NO_TRITON], capture_output=True, text=True,
                         env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.splitlines() == ["portable xla 1", "(1, 32) True"], run.stdout


# Each Pallas backend's public module and the private lowering registration behind it.
LOWERINGS = [
    ("Triton", bk.has_triton, "jax.experimental.pallas.triton",
     "jax._src.pallas.triton.pallas_call_registration"),
    ("TPU", bk.has_mosaic_tpu, "jax.experimental.pallas.tpu",
     "jax._src.pallas.mosaic.pallas_call_registration"),
]


@pytest.mark.parametrize("name,detect,public,private", LOWERINGS, ids=[r[0] for r in LOWERINGS])
def test_detection_finds_every_backend_that_imports(name, detect, public, private):
    """A backend whose modules import must be detected: a false 'missing' would send every GPU
    (or TPU) to the portable path with only a warning."""
    imported = []
    for module in (public, private):
        try:
            importlib.import_module(module)
        except ImportError:
            continue
        imported.append(module)
    assert imported, f"this jax has no Pallas {name} backend at all"
    assert detect(), f"{imported} import, but detection says there is no Pallas {name} backend"
