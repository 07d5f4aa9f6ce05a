"""`sparseinfer compile-report --cpu`: the generate programs compiled for this CPU, and their
decode loops checked for weight-sized ops (`bench.loop_ops`)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import REPORT_ENV


@pytest.fixture(scope="module")
def cpu_report(tmp_path_factory) -> tuple[subprocess.CompletedProcess, list[dict]]:
    """The report at the tiny shape, 2 layers, bf16, batch 1 and 16, in a fresh process."""
    out = tmp_path_factory.mktemp("cpu") / "report.json"
    run = subprocess.run(
        [sys.executable, "-m", "sparseinfer_jax.cli", "compile-report", "--cpu", "--shape", "tiny",
         "--layers", "2", "--batches", "1,16", "--json", str(out)],
        capture_output=True, text=True, env=REPORT_ENV, timeout=900)
    assert run.returncode in (0, 1), run.stderr[-2000:]
    return run, json.loads(out.read_text())


def test_cpu_report_compiles_both_programs_and_fails_on_any_loop_op(cpu_report):
    run, records = cpu_report
    assert {(r["name"], r["batch"]) for r in records} == {
        (f"generate_{m}", b) for m in ("dense", "sparse") for b in (1, 16)}
    for r in records:
        assert r["compiled"] and r["error"] is None and r["bytes_accessed"] > 0, r
        assert r["cpu"] == "cpu" and r["dtype"] == "bfloat16" and r["layers"] == 2, r
    failed = [ln for ln in run.stderr.splitlines() if ln.startswith("FAILED: ")]
    flagged = [r for r in records if r["loop_ops"]]
    assert len(failed) == len(flagged) and run.returncode == (1 if flagged else 0), run.stderr
    for line, r in zip(failed, flagged, strict=True):
        assert line.startswith(f"FAILED: cpu {r['name']} batch {r['batch']}: "), line


def test_dense_decode_loop_holds_no_float32_weight(cpu_report):
    """`quant.float_dot` keeps every bf16 weight bf16 in the loop and out of it."""
    for r in cpu_report[1]:
        if r["name"] == "generate_dense":
            assert r["loop_ops"] == [], r


def test_sparse_decode_loop_holds_no_float32_weight(cpu_report):
    """The chunk loop's dense-above-half branches read bf16 weights as bf16 (`quant.float_dot`)."""
    for r in cpu_report[1]:
        if r["name"] == "generate_sparse":
            assert r["loop_ops"] == [], r
