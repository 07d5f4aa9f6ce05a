"""`sparseinfer compile-report`: kernels and whole programs compiled for a real GPU, offline.

Needs the CUDA plugin (the test extra installs it on Linux) and ptxas; without them the report
exits with its one-line error and these tests fail, saying so.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from sparseinfer_jax.bench.compile_report import MAX_REGISTERS, MIN_LIVE_PER_SM
from sparseinfer_jax.cli.main import main

GPU = "h100"
PALLAS_IN_SPARSE_PROGRAM = {"sign_predict", "sparse_gate_up", "sparse_down"}


def report(tmp_path, *flags: str) -> list[dict]:
    """Runs the report in a fresh process (it sets JAX's platform and target) and reads --json."""
    out = tmp_path / "report.json"
    run = subprocess.run(
        [sys.executable, "-m", "sparseinfer_jax.cli", "compile-report", "--gpu", GPU,
         "--batches", "1,16", "--json", str(out), *flags],
        capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=900)
    assert run.returncode == 0, f"report failed:\n{run.stdout[-3000:]}\n{run.stderr[-2000:]}"
    return json.loads(out.read_text())


KERNELS = {"pack_sign_bits", "compact", "sign_predict", "signmag_predict", "sparse_gate_up_relu",
           "sparse_gate_up_fatrelu", "sparse_down"}


def check(records: list[dict], shape: str, programs: bool) -> None:
    names = {r["name"] for r in records}
    assert names == KERNELS | ({"generate_dense", "generate_sparse"} if programs else set())
    assert {r["batch"] for r in records} == {1, 16}
    for r in records:
        assert r["compiled"] and r["error"] is None, r
        assert r["spill_bytes"] == 0 and r["registers"] <= 255, r
        if r["kind"] == "kernel":
            assert r["threads"] % 32 == 0 and len(r["grid"]) == 3, r
            assert r["resident_per_sm"] >= 1, r
        if r["name"] == "generate_sparse":
            assert set(r["pallas_kernels"]) == PALLAS_IN_SPARSE_PROGRAM, r
        if r["name"] == "generate_dense":
            assert not r["pallas_kernels"], r
    if shape == "7b":  # the targets for the decode kernels at Llama-2-7B
        for r in records:
            if r["kind"] == "kernel":
                assert r["registers"] <= MAX_REGISTERS, r
                if r["name"] != "compact":  # one program by design
                    assert r["live_per_sm_10"] >= MIN_LIVE_PER_SM, r


def test_tiny_shape_compiles_kernels_and_programs(tmp_path):
    check(report(tmp_path, "--shape", "tiny"), "tiny", programs=True)


def test_7b_kernels_compile_without_spills_within_register_and_occupancy_targets(tmp_path):
    # The kernels alone: a program compiles these same kernels (tiny above checks programs).
    check(report(tmp_path, "--shape", "7b", "--no-programs"), "7b", programs=False)


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--gpu", "h100,k80"], "--gpu"),
        (["--batches", "1,x"], "--batches"),
        (["--batches", "0"], "--batches"),
        (["--shape", "3b"], "--shape"),
        (["--layers", "0"], "--layers"),
        (["--tpu", "v5e,k80"], "--tpu"),
    ],
)
def test_bad_flags_exit_2_with_one_line(argv, match, capsys):
    assert main(["compile-report", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and match in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
