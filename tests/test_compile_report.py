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
from conftest import REPORT_ENV

from sparseinfer_jax.bench.compile_policy import (
    MAX_EXTRA_LAUNCHES,
    MAX_REGISTERS,
    MAX_SPILL_BYTES,
    MIN_LIVE_PER_SM,
)
from sparseinfer_jax.bench.gpu_spec import SPECS_DIR
from sparseinfer_jax.bench.toolchain import loop_launches
from sparseinfer_jax.cli.main import main

GPU = "h100"
# The model's sparse MLP today: predictor, XLA compaction, then the two-stage kernels.
PALLAS_IN_SPARSE_PROGRAM = {"predict_gate_up", "masked_down"}  # the per-layer op on a GPU


def report(tmp_path, *flags: str, gpu: str = GPU, batches: str = "1,16"
           ) -> tuple[list[dict], list[str]]:
    """Runs the report in a fresh process (it sets JAX's platform and target); its --json records
    and its FAILED lines."""
    out = tmp_path / "report.json"
    run = subprocess.run(
        [sys.executable, "-m", "sparseinfer_jax.cli", "compile-report", "--gpu", gpu,
         "--batches", batches, "--json", str(out), *flags],
        capture_output=True, text=True, env=REPORT_ENV, timeout=1800)
    failed = [ln for ln in run.stderr.splitlines() if ln.startswith("FAILED: ")]
    assert run.returncode == (1 if failed else 0), (
        f"report failed:\n{run.stdout[-3000:]}\n{run.stderr[-2000:]}")
    return json.loads(out.read_text()), failed


KERNELS = {"pack_sign_bits", "predict_gate_up_sign", "predict_gate_up_signmag",
           "predict_gate_up_mask", "masked_down", "masked_down_atomic", "sign_predict",
           "signmag_predict", "chain_gate_up_relu", "chain_gate_up_fatrelu", "chain_down"}


def check(records: list[dict], shape: str, programs: bool) -> None:
    names = {r["name"] for r in records}
    assert names == KERNELS | {"sparse_mlp_layer"} | (
        {"generate_dense", "generate_sparse"} if programs else set())
    assert {r["batch"] for r in records} == {1, 16}
    for r in records:
        assert r["compiled"] and r["error"] is None, r
        assert r["spill_bytes"] <= MAX_SPILL_BYTES and r["registers"] <= 255, r
        if r["kind"] == "kernel":
            assert r["threads"] % 32 == 0 and len(r["grid"]) == 3, r
            assert r["resident_per_sm"] >= 1, r
        elif r["kind"] == "program":  # the decode loop found, a layer's launches, no copies
            assert r["decode_launches"] > r["launches_per_layer"] > 0, r
            assert r["loop_ops"] == [], r
        assert r["path"] == "pallas", r  # what auto runs on an H100 and an L4
        if r["name"] in ("generate_sparse", "sparse_mlp_layer"):
            assert set(r["pallas_kernels"]) == PALLAS_IN_SPARSE_PROGRAM, r
            assert r["triton_calls"] >= len(PALLAS_IN_SPARSE_PROGRAM), r
        if r["name"] == "generate_dense":
            assert not r["pallas_kernels"], r
    if shape == "7b":  # the targets for the decode kernels at Llama-2-7B
        for r in records:
            if r["kind"] == "kernel":
                assert r["registers"] <= MAX_REGISTERS, r
                assert r["live_per_sm_10"] >= MIN_LIVE_PER_SM, r


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory):
    return report(tmp_path_factory.mktemp("tiny"), "--shape", "tiny")


def test_tiny_shape_compiles_kernels_and_programs(tiny_report):
    records, failed = tiny_report
    check(records, "tiny", programs=True)
    # Only the launch target may fail (the next test): the kernels and programs pass.
    assert all("launches" in line for line in failed), failed


def test_sparse_decode_step_launches_at_most_dense_plus_two_a_layer(tiny_report):
    records, failed = tiny_report
    per_layer = {(r["batch"], r["name"]): r["launches_per_layer"] for r in records
                 if r["kind"] == "program"}
    for batch in (1, 16):
        sparse, dense = per_layer[batch, "generate_sparse"], per_layer[batch, "generate_dense"]
        assert sparse <= dense + MAX_EXTRA_LAUNCHES, (batch, sparse, dense)
    assert not failed, failed


def test_7b_kernels_compile_without_spills_within_register_and_occupancy_targets(tmp_path):
    # The kernels alone: a program compiles these same kernels (tiny above checks programs).
    records, failed = report(tmp_path, "--shape", "7b", "--no-programs")
    assert not failed, failed
    check(records, "7b", programs=False)


@pytest.mark.parametrize("path, fails", [("pallas", True), ("portable", False)])
def test_the_launch_limit_holds_the_pallas_path_and_notes_the_portable_one(path, fails):
    from sparseinfer_jax.bench import compile_policy

    base = dict(gpu="t4", batch=1, shape="tiny", compiled=True, kind="program", path=path,
                spill_bytes=0, loop_ops=[])
    records = [dict(base, name="generate_dense", launches_per_layer=20),
               dict(base, name="generate_sparse", launches_per_layer=40)]
    failed, noted = compile_policy.failures(records), compile_policy.notes(records)
    assert bool(failed) is fails and bool(noted) is not fails, (failed, noted)
    assert all("40 a layer, dense 20" in line for line in failed + noted)


def test_loop_launches_counts_the_biggest_loop_body():
    """Leaf thunks under `body:`, a conditional's biggest branch (one runs a step), containers
    and the condition not."""
    text = """001: kCustomKernel  [source] prologue grid: [1, 1, 1] threads: [32, 1, 1]
002: kWhile [prev=001 (1)]
condition:
    003: kCustomKernel [source] cond grid: [1, 1, 1] threads: [32, 1, 1]
  body:
    004: kCustomKernel [source] a grid: [1, 1, 1] threads: [32, 1, 1]
    007: kConditional [prev=004 (1)]
      false_branch:
        005: kCustomKernel [source] b grid: [1, 1, 1] threads: [32, 1, 1]
      true_branch:
        006: kCopy [source] kCopy
    008: kGemm [prev=007 (1)] gemm
009: kCustomKernel [prev=002 (1)] epilogue grid: [1, 1, 1] threads: [32, 1, 1]
"""
    assert loop_launches(text) == 3  # a, one branch's thunk, gemm
    extra = "        010: kCustomKernel [source] c grid: [1, 1, 1]\n"
    longer = text.replace("kCopy\n", "kCopy\n" + extra)
    assert loop_launches(longer) == 4  # a, the two thunks of the longer branch, gemm
    assert loop_launches("001: kCustomKernel [source] a grid: [1, 1, 1]\n") is None


def test_l4_compiles_every_pallas_kernel(tmp_path):
    """Compute capability 8.9: auto runs the Pallas Triton kernels, and all of them compile."""
    records, failed = report(tmp_path, "--shape", "tiny", "--no-programs", gpu="l4")
    assert not failed, failed
    check(records, "tiny", programs=False)


def t4_written_apart(path) -> str:
    """A T4 spec made from the A100 one as a user would (not the shipped t4.txtpb)."""
    with open(os.path.join(SPECS_DIR, "a100.txtpb")) as f:
        text = f.read()
    for old, new in [("major: 8", "major: 7\n    minor: 5"), ("core_count: 108", "core_count: 40"),
                     ("shared_memory_per_core: 167936", "shared_memory_per_core: 65536"),
                     ("NVIDIA A100-SXM4-80GB", "Tesla T4")]:
        assert old in text
        text = text.replace(old, new)
    path.write_text(text)
    return str(path)


def check_t4(records: list[dict], gpu: str, batches: set[int], programs: bool) -> None:
    """Below compute capability 8.0 auto takes the portable path: no Pallas Triton kernel is
    compiled, and the sparse MLP layer and the generate programs compile, in float16 (a T4's
    16-bit dtype), with no Triton call in them."""
    assert {r["name"] for r in records} == {"sparse_mlp_layer"} | (
        {"generate_dense", "generate_sparse"} if programs else set())
    assert {r["gpu"] for r in records} == {gpu}
    assert {r["batch"] for r in records} == batches
    for r in records:
        assert r["compiled"] and r["path"] == "portable" and r["dtype"] == "float16", r
        assert r["triton_calls"] == 0 and r["pallas_kernels"] == [], r


def test_t4_compiles_with_no_triton_kernel(tmp_path):
    records, _ = report(tmp_path, "--shape", "7b", "--no-programs", gpu="t4")
    check_t4(records, "t4", {1, 16}, programs=False)


@pytest.fixture(scope="module")
def t4_tiny_report(tmp_path_factory):
    """The programs at the tiny shape for a T4 spec written apart from the A100's, as a user
    would (not the shipped t4.txtpb), batch 1: the decode step's matvecs, where the float16 dot
    rule applies (batch 16's merged dots are tests/test_matmul.py's)."""
    tmp_path = tmp_path_factory.mktemp("t4")
    gpu = t4_written_apart(tmp_path / "my-t4.txtpb")
    return report(tmp_path, "--shape", "tiny", "--layers", "2", gpu=gpu, batches="1")[0]


def test_t4_programs_compile_with_no_triton_kernel_and_dense_reads_float16(t4_tiny_report):
    """The dense decode loop holds no float32 copy of a float16 weight (`quant.float_dot`)."""
    check_t4(t4_tiny_report, "my-t4", {1}, programs=True)
    for r in t4_tiny_report:
        if r["name"] == "generate_dense":
            assert r["loop_ops"] == [], r


def test_t4_sparse_decode_loop_reads_float16(t4_tiny_report):
    """The portable path's buckets and dense branch read float16 rows as float16."""
    for r in t4_tiny_report:
        if r["name"] == "generate_sparse":
            assert r["loop_ops"] == [], r


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--gpu", "h100,k80"], "--gpu"),
        (["--gpu", "no/such/spec.txtpb"], "--gpu"),
        (["--gpu", os.path.abspath(__file__)], "GPU spec"),
        (["--batches", "1,x"], "--batches"),
        (["--batches", "0"], "--batches"),
        (["--shape", "3b"], "--shape"),
        (["--layers", "0"], "--layers"),
        (["--tpu", "v5e,k80"], "--tpu"),
    ],
)
def test_bad_flags_exit_2_with_one_line(argv, match, capsys):
    assert main(["compile-report", *argv]) == 2
    out, err = capsys.readouterr()
    assert not out  # refused before the table's header
    assert err.startswith("error: ") and match in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
