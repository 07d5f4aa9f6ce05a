"""Offline GPU compile report: every Pallas kernel and the whole decode program, compiled for real
GPUs on a machine without one (`sparseinfer compile-report`).

How. With the CUDA PJRT plugin installed (`jax-cuda12-plugin`, `jax-cuda12-pjrt`, the version of
jax) and the CPU as JAX's platform, `jax.experimental.topologies` builds a compile-only device from
a GPU spec (XLA's `GpuTargetConfigProto`, in `gpu_specs/`), and `jit(fn).trace(...).lower()
.compile()` runs XLA's whole GPU compiler on abstract arguments (`ShapeDtypeStruct`s: no weight is
ever allocated): Pallas -> Triton -> PTX, and ptxas -> cubin. The compile dumps its PTX and its
thunk sequence (`xla_dump_to`); the launch shapes (grid, threads, shared memory) come from the
thunk sequence, and registers and spills from `ptxas -v` run again on the dumped PTX for its
target. A Pallas kernel that fails to compile, spills over 32 bytes, uses over 128 registers or
(at the 7b and 13b shapes) has under 4 programs with work per SM at 10% active makes the report
fail; a program's record holds its Pallas kernels' figures, and XLA's own fusions apart
(`xla_registers`, `xla_spills`).

What is compiled for each GPU, inside `backend.targeting_gpu` with the spec's compute capability,
so "auto" picks what that GPU can run (`backend.choose`, said in the report's first line per GPU):
the sparse MLP layer as auto runs it (`sparse_mlp_layer`; its `triton_calls` counts the Pallas
Triton calls, 0 below compute capability 8.0 where auto takes the portable path), every Pallas
Triton kernel (only where auto runs them), and the `generate` programs on backend "auto".
`--gpu` takes shipped spec names and spec files (`gpu_spec.gpu_spec`).

Launches per layer: the thunk sequence nests a loop's body under it, so the decode step's
launches are counted in the body of the program's biggest loop, and a second compile at another
depth gives what one layer adds (`launches_per_layer`). The report fails when the sparse step's
layer launches more than the dense one's plus `MAX_EXTRA_LAUNCHES`: each launch costs about a
microsecond on a GPU even in a CUDA graph (issue 20).

Occupancy arithmetic per kernel: `resident` = programs one SM can hold at once (registers,
threads, shared memory and the 32-block limit), `live@5/10/20%` = programs that have work when
that fraction of the neurons is active, per SM of the GPU (`core_count` in its spec). Memory
bandwidth wants several live programs per SM, each with loads in flight.

This module compiles and tabulates; `toolchain` finds the plugin and ptxas and reads what a
compile leaves behind, `occupancy` does the arithmetic, `compile_cases` says what is compiled and
`compile_policy` what fails.
"""

from __future__ import annotations

import functools
import glob
import os
import tempfile
import warnings
from collections.abc import Callable
from typing import Any

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from pallas_kernels import backend as bk
from pallas_kernels.gpu.triton_check import TRITON_CALL_TARGET
from sparseinfer_jax.bench.compile_cases import Case, kernel_cases, layer_case, program_cases
from sparseinfer_jax.bench.gpu_spec import GpuSpec, gpu_spec, run_dtype
from sparseinfer_jax.bench.loop_ops import loop_ops, thresholds
from sparseinfer_jax.bench.occupancy import live_per_sm, resident_programs
from sparseinfer_jax.bench.shapes import shape_config
from sparseinfer_jax.bench.toolchain import (
    check_plugin,
    find_ptxas,
    launches,
    loop_launches,
    mesh_for,
    ptxas_usage,
)
from sparseinfer_jax.errors import UserError
from sparseinfer_jax.model import dtypes
from sparseinfer_jax.model.config import LlamaConfig

# Newer XLA dumps PTX only for emitters this matches (older XLA dumps it anyway). CUB's radix sort
# (top-p sampling sorts the vocabulary) sizes its scratch with the CUDA runtime, which a machine
# without a GPU lacks: offline, sorts compile as XLA's own sort kernels.
COMPILE_OPTIONS = {"xla_dump_emitter_re": "ptx", "xla_gpu_enable_cub_radix_sort": False}
PALLAS_KERNELS = {
    "pack_sign_bits", "sign_predict", "signmag_predict", "sparse_gate_up", "sparse_down",
    "predict_gate_up", "masked_down",
}


def _abstract(sharding, shape, dtype) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)


def compile_case(case: Case, spec: GpuSpec, ptxas: str, loop: dict | None = None) -> dict:
    """Compiles one case for `spec`'s GPU; the record's launch and usage fields (None when the
    compile failed), and for a program with `loop` (`loop_ops.thresholds`) its decode loop's
    weight-sized ops (`loop_ops`)."""
    rec: dict[str, Any] = dict(name=case.name, kind=case.kind, compiled=False, error=None,
                               registers=None, spill_bytes=None, grid=None, threads=None,
                               shared_bytes=None, kernels=None, triton_calls=None)
    with tempfile.TemporaryDirectory() as dump:
        try:
            lowered = jax.jit(case.fn).trace(*case.args).lower()
            rec["triton_calls"] = lowered.as_text().count(TRITON_CALL_TARGET)
            compiled = lowered.compile(COMPILE_OPTIONS | {"xla_dump_to": dump})
            usage, runs = ptxas_usage(dump, ptxas), launches(dump)
            loops = []
            for path in glob.glob(os.path.join(dump, "*thunk_sequence.txt")):
                with open(path) as f:
                    loops.append(loop_launches(f.read()))
        except Exception as e:  # noqa: BLE001 - any compiler error is the report's finding
            rec["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300]}"
            return rec
    rec["compiled"] = True
    rec["kernels"] = len(runs)
    if case.kind == "kernel":
        (run,) = [r for r in runs if r["name"] == case.kernel]
        rec.update(grid=run["grid"], threads=run["threads"], shared_bytes=run["shared_bytes"],
                   **usage.get(run["name"], dict(registers=None, spill_bytes=None)))
        rec["resident_per_sm"] = resident_programs(spec, rec["threads"], rec["registers"],
                                                   rec["shared_bytes"])
    else:
        ours = {k: u for k, u in usage.items() if k in PALLAS_KERNELS}
        rec["registers"] = max((u["registers"] for u in ours.values()), default=0)
        rec["spill_bytes"] = sum(u["spill_bytes"] for u in ours.values())
        rec["pallas_kernels"] = sorted(ours)
        rec["xla_registers"] = max((u["registers"] for k, u in usage.items() if k not in ours),
                                   default=0)
        rec["xla_spills"] = {k: u["spill_bytes"] for k, u in usage.items()
                             if k not in ours and u["spill_bytes"]}
        rec["decode_launches"] = max((n for n in loops if n is not None), default=None)
        if loop is not None and case.kind == "program":
            rec["loop_ops"] = loop_ops(compiled, loop)
    return rec


def launches_per_layer(cfg: LlamaConfig, shape: str, batch: int, dtype, sds: Callable,
                       spec: GpuSpec, ptxas: str, records: list[dict]) -> None:
    """Adds `launches_per_layer` to the `generate_*` records of `records` (compiled at cfg's
    depth L): the decode step's launches at L, less those at another depth (1, or 2 when L is
    1), over the difference in depth. What a layer costs in launches, whatever the step's fixed
    part (embedding, LM head, sampling)."""
    depth = cfg.num_hidden_layers
    other = 1 if depth > 1 else 2
    at_other = {c.name: compile_case(c, spec, ptxas).get("decode_launches")
                for c in program_cases(shape_config(shape, other), batch, dtype, sds)}
    for rec in records:
        n, m = rec.get("decode_launches"), at_other.get(rec["name"])
        if n is not None and m is not None:
            rec["launches_per_layer"] = (n - m) / (depth - other)


def check(gpus: list[str], shape: str, batches: list[int], layers: int | None = None
          ) -> tuple[list[GpuSpec], LlamaConfig]:
    """The GPUs' specs and the shape's config; UserError for a bad name or batch size."""
    specs = [gpu_spec(g) for g in gpus]
    if not batches or min(batches) < 1:
        raise UserError(f"--batches must be positive integers, got {batches}.")
    return specs, shape_config(shape, layers)


def run(gpus: list[str], shape: str, batches: list[int], *, layers: int | None = None,
        dtype: str = "bfloat16", programs: bool = True,
        log: Callable[[str], None] = print) -> list[dict]:
    """Compiles every case for every GPU and batch; returns the records (see `format_row`)."""
    specs, cfg = check(gpus, shape, batches, layers)
    check_plugin()
    ptxas = find_ptxas()
    records = []
    for spec in specs:
        mesh = mesh_for(spec)
        sds = functools.partial(_abstract, NamedSharding(mesh, P()))
        with bk.targeting_gpu(mesh.abstract_mesh, compute_capability=spec.compute_capability):
            with warnings.catch_warnings():  # a fallback is said in the next line instead
                warnings.simplefilter("ignore", RuntimeWarning)
                choice = bk.choose("auto")
            log(f"{spec.name:<13}{choice.line()}")
            dt = run_dtype(spec, dtype)  # a T4's models run in float16
            loop = thresholds(cfg, dtypes.DTYPES[dt])
            for batch in batches:
                cases = [layer_case(cfg, batch, dtypes.DTYPES[dt], sds)]
                if choice.path == "pallas":  # else auto runs none of them on this GPU
                    cases += kernel_cases(cfg, batch, dtypes.DTYPES[dt], sds,
                                          pack_weights=batch == batches[0])
                if programs:
                    cases += program_cases(cfg, batch, dtypes.DTYPES[dt], sds)
                done = []
                for case in cases:
                    rec = dict(gpu=spec.name, device_kind=spec.device_kind, shape=shape,
                               layers=cfg.num_hidden_layers, dtype=dt, batch=batch,
                               path=choice.path, **compile_case(case, spec, ptxas, loop))
                    if case.live is not None and rec["compiled"]:
                        rec.update(live_per_sm(case.live, spec, cfg.intermediate_size))
                    if rec["kind"] != "program":
                        log(format_row(rec))
                    done.append(rec)
                programs_done = [r for r in done if r["kind"] == "program"]
                if programs_done:
                    launches_per_layer(cfg, shape, batch, dtypes.DTYPES[dt], sds, spec, ptxas,
                                       programs_done)
                    for rec in programs_done:
                        log(format_row(rec))
                records += done
    return records


HEADER = (f"{'gpu':<13}{'batch':>5}  {'name':<24}{'ok':>3}{'regs':>6}{'spill':>6}"
          f"{'grid':>16}{'thr':>5}{'smem':>7}{'res/SM':>7}{'live/SM 5%':>11}{'10%':>7}{'20%':>7}"
          f"{'loop ops':>9}")


def format_row(r: dict) -> str:
    """One table row (the header is `HEADER`)."""
    if not r["compiled"]:
        return f"{r['gpu']:<13}{r['batch']:>5}  {r['name']:<24}  no  {r['error']}"
    cell = lambda v: "-" if v is None else str(v)  # noqa: E731
    grid = "x".join(map(str, r["grid"])) if r["grid"] else f"{r['kernels']} kernels"
    if r.get("launches_per_layer") is not None:
        grid = f"{r['kernels']}k {r['launches_per_layer']:g}/layer"
    return (f"{r['gpu']:<13}{r['batch']:>5}  {r['name']:<24}{'yes':>3}{cell(r['registers']):>6}"
            f"{cell(r['spill_bytes']):>6}{grid:>16}{cell(r['threads']):>5}"
            f"{cell(r['shared_bytes']):>7}{cell(r.get('resident_per_sm')):>7}"
            f"{cell(r.get('live_per_sm_5')):>11}{cell(r.get('live_per_sm_10')):>7}"
            f"{cell(r.get('live_per_sm_20')):>7}"
            f"{cell(len(r['loop_ops']) if 'loop_ops' in r else None):>9}")
