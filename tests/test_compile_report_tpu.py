"""`sparseinfer compile-report --tpu`: the Pallas TPU kernels compiled for a TPU v5e, offline.

Needs libtpu (`pip install "jax[tpu]==<jax's version>"`); without it the compiling tests skip and
the report's one-line install hint is checked instead.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest
from conftest import REPORT_ENV

from sparseinfer_jax.bench.compile_report_tpu import PROGRAM_MODES

HAVE_LIBTPU = importlib.util.find_spec("libtpu") is not None
needs_libtpu = pytest.mark.skipif(
    not HAVE_LIBTPU, reason='libtpu is not installed (pip install "jax[tpu]==<jax version>")')
KERNELS = {"sign_votes", "signmag_votes", "gate_relu", "gate_fatrelu", "up_down", "layer_sign"}
# Each Mosaic kernel's VMEM at the 7b shape stays far under the 128 MiB the compiler gives it.
MAX_VMEM = 8 * 2**20


def report(tmp_path, *flags: str) -> subprocess.CompletedProcess:
    """The report in a fresh process (it sets JAX's platform), records in tmp_path/report.json."""
    return subprocess.run(
        [sys.executable, "-m", "sparseinfer_jax.cli", "compile-report", "--tpu", "v5e",
         "--batches", "1,16", "--json", str(tmp_path / "report.json"), *flags],
        capture_output=True, text=True, env=REPORT_ENV, timeout=900)


def records(tmp_path, *flags: str) -> list[dict]:
    run = report(tmp_path, *flags)
    assert run.returncode == 0, f"report failed:\n{run.stdout[-3000:]}\n{run.stderr[-2000:]}"
    return json.loads((tmp_path / "report.json").read_text())


def check(recs: list[dict], programs: bool) -> None:
    assert {r["name"] for r in recs} == KERNELS | (
        {f"generate_{m}" for m in PROGRAM_MODES} if programs else set())
    assert {r["batch"] for r in recs} == {1, 16}
    for r in recs:
        assert r["compiled"] and r["error"] is None and r["weight_copies"] == [], r
        assert r["device_kind"] == "TPU v5 lite", r
        if r["kind"] != "program":
            assert r["vmem_bytes"] and all(0 <= v <= MAX_VMEM for v in r["vmem_bytes"].values())
        else:  # no weight-sized op in the decode loop or hoisted out of it; XLA's byte count
            assert r["loop_ops"] == [] and r["bytes_accessed"] > 0, r
        if r["name"] == "layer_sign":
            assert set(r["vmem_bytes"]) == {"sign_votes", "tpu_gate", "tpu_up_down"}, r


@needs_libtpu
def test_tiny_shape_compiles_tpu_kernels_and_the_dense_program(tmp_path):
    check(records(tmp_path, "--shape", "tiny"), programs=True)


@needs_libtpu
def test_7b_tpu_kernels_compile_with_no_weight_sized_copy(tmp_path):
    check(records(tmp_path, "--shape", "7b", "--no-programs"), programs=False)


@pytest.mark.skipif(HAVE_LIBTPU, reason="libtpu is installed")
def test_without_libtpu_the_report_says_how_to_install_it(tmp_path):
    run = report(tmp_path, "--shape", "tiny")
    assert run.returncode == 2
    assert 'pip install "jax[tpu]==' in run.stderr, run.stderr[-2000:]
