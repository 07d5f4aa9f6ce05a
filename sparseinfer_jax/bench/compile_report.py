"""Offline GPU compile report: every Pallas kernel and the whole decode program, compiled for real
GPUs on a machine without one (`sparseinfer compile-report`).

How. With the CUDA PJRT plugin installed (`jax-cuda12-plugin`, `jax-cuda12-pjrt`, the version of
jax) and the CPU as JAX's platform, `jax.experimental.topologies` builds a compile-only device from
a GPU spec (XLA's `GpuTargetConfigProto`, in `gpu_specs/`), and `jit(fn).trace(...).lower()
.compile()` runs XLA's whole GPU compiler on abstract arguments (`ShapeDtypeStruct`s: no weight is
ever allocated): Pallas -> Triton -> PTX, and ptxas -> cubin. The compile dumps its PTX and its
thunk sequence (`xla_dump_to`); the launch shapes (grid, threads, shared memory) come from the
thunk sequence, and registers and spills from `ptxas -v` run again on the dumped PTX for its
target (spills twice: at ptxas's default register-usage level, and at level 10, where only
register pressure spills). A Pallas kernel that fails to compile, spills at level 10, uses over
128 registers or (at the 7b and 13b shapes) has under 4 programs with work per SM at 10% active
makes the report fail; a program's record holds its Pallas kernels' figures, and XLA's own
fusions apart (`xla_registers`, `xla_spills`).

Launches per layer: the thunk sequence nests a loop's body under it, so the decode step's
launches are counted in the body of the program's biggest loop, and a second compile at another
depth gives what one layer adds (`launches_per_layer`). The report fails when the sparse step's
layer launches more than the dense one's plus `MAX_EXTRA_LAUNCHES`: each launch costs about a
microsecond on a GPU even in a CUDA graph (issue 20).

Occupancy arithmetic per kernel: `resident` = programs one SM can hold at once (registers,
threads, shared memory and the 32-block limit), `live@5/10/20%` = programs that have work when
that fraction of the neurons is active, per SM of the GPU (`core_count` in its spec). Memory
bandwidth wants several live programs per SM, each with loads in flight.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import importlib.util
import math
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from pallas_kernels import backend as bk
from pallas_kernels import masked_down, pack, predict, predict_gate_up, signmag
from pallas_kernels.sparse_down import num_live_programs as down_live
from pallas_kernels.sparse_down import sparse_down_pallas
from pallas_kernels.sparse_gate_up import num_live_programs as gate_up_live
from pallas_kernels.sparse_gate_up import sparse_gate_up_pallas
from sparseinfer_jax import bench
from sparseinfer_jax.bench.gpu_spec import GpuSpec, gpu_spec
from sparseinfer_jax.bench.shapes import DTYPES, PROMPT_TOKENS, shape_config
from sparseinfer_jax.errors import UserError
from sparseinfer_jax.model.config import LlamaConfig
from sparseinfer_jax.model.llama import Llama
from sparseinfer_jax.runtime import generation

# bench's shapes and Llama-2-13B (compiled only: no weights are made).
SHAPES = {**bench.SHAPES,
          "13b": dict(hidden_size=5120, intermediate_size=13824, num_attention_heads=40,
                      num_key_value_heads=40, head_dim=128, num_hidden_layers=40,
                      vocab_size=32000)}
ACTIVE_FRACTIONS = (0.05, 0.1, 0.2)
NEW_TOKENS = 16  # decode slots of the compiled program (its kernels do not depend on it)
MAX_REGISTERS = 128
MIN_LIVE_PER_SM = 4
# A sparse decode step may launch at most this many more kernels a layer than the dense one.
MAX_EXTRA_LAUNCHES = 2
# The shapes the live-programs target applies to (a tiny layer cannot fill a GPU).
TARGET_SHAPES = ("7b", "13b")
# Newer XLA dumps PTX only for emitters this matches (older XLA dumps it anyway). CUB's radix sort
# (top-p sampling sorts the vocabulary) sizes its scratch with the CUDA runtime, which a machine
# without a GPU lacks: offline, sorts compile as XLA's own sort kernels.
COMPILE_OPTIONS = {"xla_dump_emitter_re": "ptx", "xla_gpu_enable_cub_radix_sort": False}
PALLAS_KERNELS = {
    "pack_sign_bits", "sign_predict", "signmag_predict", "sparse_gate_up", "sparse_down",
    "predict_gate_up", "masked_down",
}
PLUGIN_MODULES = ("jax_plugins.xla_cuda12", "jax_plugins.xla_cuda13")


def find_ptxas() -> str:
    """ptxas on PATH, else the one pip's nvidia-cuda-nvcc ships (UserError when neither)."""
    path = shutil.which("ptxas")
    if path is None and importlib.util.find_spec("nvidia") is not None:
        import nvidia

        found = [p for d in nvidia.__path__ for p in glob.glob(os.path.join(d, "*/bin/ptxas"))]
        path = found[0] if found else None
    if path is None:
        raise UserError("no ptxas found: install the CUDA toolkit's ptxas on PATH "
                        "(or pip install nvidia-cuda-nvcc-cu12) to compile for a GPU.")
    return path


def check_plugin() -> None:
    """UserError unless a CUDA PJRT plugin is installed (it carries XLA's GPU compiler)."""
    if not any(importlib.util.find_spec(m.split(".")[0]) and importlib.util.find_spec(m)
               for m in PLUGIN_MODULES):
        raise UserError(
            "the CUDA PJRT plugin is not installed: pip install "
            f"jax-cuda12-plugin=={jax.__version__} jax-cuda12-pjrt=={jax.__version__} "
            "(the test extra has them)."
        )


def mesh_for(spec: GpuSpec) -> jax.sharding.Mesh:
    """A one-device mesh of compile-only devices of `spec`'s kind."""
    from jax.experimental import topologies

    topo = topologies.get_topology_desc(platform="cuda", topology="1x1x1", target_config=spec.text)
    return topologies.make_mesh(topo, (1,), ("x",))


# --- what a compile leaves behind ------------------------------------------------------------

_THUNK = re.compile(r"k\w*Kernel\b.*?\s(\S+) grid: \[(\d+), (\d+), (\d+)\] threads: "
                    r"\[(\d+), (\d+), (\d+)\]\s+shared_memory: (\d+)")


def launches(dump: str) -> list[dict]:
    """Kernel launches of the compiled module: name, grid, threads, shared_bytes."""
    out = []
    for path in glob.glob(os.path.join(dump, "*thunk_sequence.txt")):
        with open(path) as f:
            for m in _THUNK.finditer(f.read()):
                g = [int(v) for v in m.group(2, 3, 4)]
                t = [int(v) for v in m.group(5, 6, 7)]
                out.append(dict(name=m.group(1), grid=g, threads=math.prod(t),
                                shared_bytes=int(m.group(8))))
    return out


# Thunks that hold others (a loop, a branch, a graph) rather than launch work themselves.
_CONTAINERS = {"kWhile", "kConditional", "kSequential", "kCommandBuffer", "kDynamicSlice"}
_THUNK_LINE = re.compile(r"^(\s*)(?:\d+: (k\w+)|(\w+):\s*$)")


def loop_launches(text: str) -> int | None:
    """Launches in one run of the biggest loop body of a thunk sequence (`*thunk_sequence.txt`):
    every thunk that does work (a kernel, a library call, a copy), both sides of each branch
    included; None when there is no loop. In a `generate` program that loop is the decode step."""
    best = None
    lines = [m for m in map(_THUNK_LINE.match, text.splitlines()) if m]
    for i, m in enumerate(lines):
        if m.group(3) != "body":
            continue
        depth, count = len(m.group(1)), 0
        for inner in lines[i + 1:]:
            if len(inner.group(1)) <= depth:
                break
            count += bool(inner.group(2)) and inner.group(2) not in _CONTAINERS
        best = count if best is None else max(best, count)
    return best


# ptxas's default register-usage level may cap a kernel's registers at an occupancy step and
# spill a few bytes to reach it (seen offline: 8-40 bytes at 40-48 registers, on kernels that
# need 48-64 without spilling). At level 10 it spills only when registers run out: that is the
# report's spill failure; the default level's figure is kept beside it (`spill_bytes`).
PRESSURE_OPTION = "--register-usage-level=10"


def _ptxas(ptxas: str, path: str, *options: str) -> str | None:
    """`ptxas -v` on a PTX file for its own target; its report (stderr), or None when this ptxas
    does not know one of `options`.

    XLA compiles PTX in-process with its own (possibly newer) PTX compiler; when this ptxas is
    older than the PTX's ISA version, the file is assembled again as the newest version it reads
    (the kernels use no newer instruction; if one did, ptxas says so and the case fails).
    """
    with open(path) as f:
        ptx = f.read()
    target = re.search(r"^\.target (\w+)", ptx, re.M).group(1)
    cmd = [ptxas, "-v", *options, f"-arch={target}", "-o", os.devnull]
    run = subprocess.run([*cmd, path], capture_output=True, text=True)
    older = re.search(r"Unsupported \.version [\d.]+; current version is '([\d.]+)'", run.stderr)
    if older:
        ptx = re.sub(r"^\.version [\d.]+", f".version {older.group(1)}", ptx, count=1, flags=re.M)
        run = subprocess.run([*cmd, "-"], input=ptx, capture_output=True, text=True)
    if run.returncode and options and "Unknown option" in run.stderr:
        return None
    if run.returncode:
        raise RuntimeError(f"ptxas failed on {os.path.basename(path)}: {run.stderr.strip()}")
    return run.stderr


def _usage(report: str) -> dict[str, dict]:
    """{"registers", "spill_bytes"} per entry function of a `ptxas -v` report."""
    usage: dict[str, dict] = {}
    name = None
    for line in report.splitlines():
        if m := re.search(r"Compiling entry function '(\S+)'", line):
            name = m.group(1)
            usage[name] = dict(registers=0, spill_bytes=0)
        elif name and (m := re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)):
            usage[name]["spill_bytes"] = int(m.group(1)) + int(m.group(2))
        elif name and (m := re.search(r"Used (\d+) registers", line)):
            usage[name]["registers"] = int(m.group(1))
    return usage


def ptxas_usage(dump: str, ptxas: str) -> dict[str, dict]:
    """Per entry function of the dumped PTX: {"registers", "spill_bytes"} from `ptxas -v`, and
    "pressure_spill_bytes" at `PRESSURE_OPTION` (the default's figure where ptxas lacks it)."""
    usage: dict[str, dict] = {}
    for path in glob.glob(os.path.join(dump, "*.ptx")):
        if os.path.getsize(path) == 0:
            continue
        default = _usage(_ptxas(ptxas, path))
        report = _ptxas(ptxas, path, PRESSURE_OPTION)
        pressure = default if report is None else _usage(report)
        for name, u in default.items():
            usage[name] = dict(u, pressure_spill_bytes=pressure.get(name, u)["spill_bytes"])
    return usage


def resident_programs(spec: GpuSpec, threads: int, registers: int, shared: int) -> int:
    """Programs (thread blocks) one SM holds at once: registers are allocated per warp in units
    of 256, at most 32 blocks per SM."""
    warps = -(-threads // 32)
    per_warp = -(-max(registers, 1) * 32 // 256) * 256
    limits = [32, spec.threads_per_sm // threads, spec.registers_per_sm // (warps * per_warp)]
    if shared:
        limits.append(spec.shared_per_sm // shared)
    return min(limits)


# --- what is compiled --------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Case:
    """One thing to compile: `fn(*args)`; `live(count)` = its programs with work at `count`
    active neurons (None for whole programs)."""

    name: str
    kind: str
    fn: Callable
    args: tuple
    live: Callable[[int], int] | None = None
    kernel: str | None = None  # the Pallas kernel's name in the compiled module


def kernel_cases(cfg: LlamaConfig, batch: int, dtype, sds: Callable, *,
                 pack_weights: bool = True) -> list[Case]:
    """Every Pallas kernel at one layer's shapes (the decode step's arguments). pack_sign_bits
    packs W_gate `[F, D]` (its use), whatever the batch: only with `pack_weights`."""
    d, f = cfg.hidden_size, cfg.intermediate_size
    x, w = sds((batch, d), dtype), sds((f, d), dtype)
    idx, count = sds((f,), jnp.int32), sds((), jnp.int32)
    bits = sds((f, pack.num_words(d)), jnp.uint32)
    gate_up = lambda act: functools.partial(  # noqa: E731
        sparse_gate_up_pallas, activation=act,
        threshold=0.0 if act == "relu" else 0.1)
    # The sparse MLP op's two kernels (`sparse_layer.sparse_mlp_layer` on a GPU): each vote, the
    # mask input (oracle, or a union over a mesh axis), and both ways of adding the down blocks.
    fused = lambda vote, act, zero: functools.partial(  # noqa: E731
        predict_gate_up.predict_gate_up_pallas, vote=vote, activation=act,
        threshold=0.0 if act == "relu" else 0.1, zero_out=zero)
    alpha = sds((), jnp.float32)
    h, acc = sds((batch, f), jnp.float32), sds((batch, d), jnp.float32)
    fused_live = lambda c: predict_gate_up.num_programs(f)  # noqa: E731
    down_new_live = lambda c: masked_down.num_live_programs(c, f, d)  # noqa: E731
    cases = [
        Case("predict_gate_up_sign", "kernel",
             lambda x, g, u, a, b: fused("sign", "relu", False)(x, g, u, alpha=a, bits=b),
             (x, w, w, alpha, bits), fused_live, "predict_gate_up"),
        Case("predict_gate_up_signmag", "kernel",
             lambda x, g, u, a, b: fused("signmag", "fatrelu", True)(x, g, u, alpha=a, bits=b),
             (x, w, w, alpha, bits), fused_live, "predict_gate_up"),
        Case("predict_gate_up_mask", "kernel",
             lambda x, g, u, m: fused("mask", "relu", False)(x, g, u, mask=m),
             (x, w, w, sds((f,), jnp.bool_)), fused_live, "predict_gate_up"),
        Case("masked_down", "kernel", masked_down.masked_down_pallas, (h, w), down_new_live,
             "masked_down"),
        Case("masked_down_atomic", "kernel",
             functools.partial(masked_down.masked_down_pallas, accumulate="atomic"), (h, w, acc),
             down_new_live, "masked_down"),
        Case("sign_predict", "kernel", predict.sign_predict_pallas, (x, bits, alpha),
             lambda c: predict.num_programs(f), "sign_predict"),
        Case("signmag_predict", "kernel", signmag.signmag_pallas, (x, bits),
             lambda c: signmag.num_programs(f), "signmag_predict"),
        Case("sparse_gate_up_relu", "kernel", gate_up("relu"), (x, w, w, idx, count),
             lambda c: gate_up_live(c, d), "sparse_gate_up"),
        Case("sparse_gate_up_fatrelu", "kernel", gate_up("fatrelu"), (x, w, w, idx, count),
             lambda c: gate_up_live(c, d), "sparse_gate_up"),
        Case("sparse_down", "kernel", sparse_down_pallas,
             (sds((batch, f), jnp.float32), w, idx, count), lambda c: down_live(c, d),
             "sparse_down"),
    ]
    if pack_weights:  # the batch-independent kernel, at the first batch only
        cases.insert(0, Case("pack_sign_bits", "kernel", pack.pack_sign_bits_pallas, (w,),
                             lambda c: pack.num_programs(f, d), "pack_sign_bits"))
    return cases


def _generate_program(state, tokens, pad, follow, temperature, top_p, penalty, key, stop, alpha,
                      *, graphdef, mode, backend, top_k, eos_ids, pad_id):
    """What `generate` runs, as one program: the dense prefill, then the decode loop in `mode`."""
    shared = dict(graphdef=graphdef, backend=backend, top_k=top_k, eos_ids=eos_ids, pad_id=pad_id)
    cache, loop = generation._prefill(state, tokens, pad, follow, temperature, top_p, penalty, key,
                                      **shared)
    return generation._decode(state, cache, loop, pad, stop, temperature, top_p, penalty, alpha,
                              mode=mode, stats=None, **shared)


def program_cases(cfg: LlamaConfig, batch: int, dtype, sds: Callable) -> list[Case]:
    """The whole `generate` (dense prefill + decode loop) per MLP mode, weights abstract."""
    cases = []
    prompt, new = generation.bucket(PROMPT_TOKENS), generation.bucket(NEW_TOKENS)
    key = jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0)))
    scalar = sds((), jnp.float32)
    for mode in ("dense", "sparse"):
        model = nnx.eval_shape(
            lambda mode=mode: Llama(cfg, dtype=dtype, rngs=nnx.Rngs(0), mode=mode,
                                    backend="pallas"))
        graphdef, state = nnx.split(model)
        state = jax.tree.map(lambda a: sds(a.shape, a.dtype), state)
        statics = dict(mode=mode, backend="pallas", top_k=None,
                       eos_ids=tuple(cfg.eos_token_ids), pad_id=int(cfg.pad_token_id or 0))
        args = (state, sds((batch, prompt), jnp.int32), sds((batch,), jnp.int32),
                sds((batch, new), jnp.int32), scalar, scalar, scalar, sds(key.shape, key.dtype),
                sds((), jnp.int32), sds((cfg.num_hidden_layers,), jnp.float32))
        fn = functools.partial(_generate_program, graphdef=graphdef, **statics)
        cases.append(Case(f"generate_{mode}", "program", fn, args))
    return cases


def _abstract(sharding, shape, dtype) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)


def compile_case(case: Case, spec: GpuSpec, ptxas: str) -> dict:
    """Compiles one case for `spec`'s GPU; the record's launch and usage fields (None when the
    compile failed)."""
    rec: dict[str, Any] = dict(name=case.name, kind=case.kind, compiled=False, error=None,
                               registers=None, spill_bytes=None, pressure_spill_bytes=None,
                               grid=None, threads=None,
                               shared_bytes=None, kernels=None)
    with tempfile.TemporaryDirectory() as dump:
        try:
            lowered = jax.jit(case.fn).trace(*case.args).lower()
            lowered.compile(COMPILE_OPTIONS | {"xla_dump_to": dump})
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
                   **usage.get(run["name"], dict(registers=None, spill_bytes=None,
                                                 pressure_spill_bytes=None)))
        rec["resident_per_sm"] = resident_programs(spec, rec["threads"], rec["registers"],
                                                   rec["shared_bytes"])
    else:
        ours = {k: u for k, u in usage.items() if k in PALLAS_KERNELS}
        rec["registers"] = max((u["registers"] for u in ours.values()), default=0)
        rec["spill_bytes"] = sum(u["spill_bytes"] for u in ours.values())
        rec["pressure_spill_bytes"] = sum(u["pressure_spill_bytes"] for u in ours.values())
        rec["pallas_kernels"] = sorted(ours)
        rec["xla_registers"] = max((u["registers"] for k, u in usage.items() if k not in ours),
                                   default=0)
        rec["xla_spills"] = {k: u["spill_bytes"] for k, u in usage.items()
                             if k not in ours and u["spill_bytes"]}
        rec["decode_launches"] = max((n for n in loops if n is not None), default=None)
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
                for c in program_cases(shape_config(shape, other, SHAPES), batch, dtype, sds)}
    for rec in records:
        n, m = rec.get("decode_launches"), at_other.get(rec["name"])
        if n is not None and m is not None:
            rec["launches_per_layer"] = (n - m) / (depth - other)


def run(gpus: list[str], shape: str, batches: list[int], *, layers: int | None = None,
        dtype: str = "bfloat16", programs: bool = True,
        log: Callable[[str], None] = print) -> list[dict]:
    """Compiles every case for every GPU and batch; returns the records (see `format_table`)."""
    specs = [gpu_spec(g) for g in gpus]
    if not batches or min(batches) < 1:
        raise UserError(f"--batches must be positive integers, got {batches}.")
    cfg = shape_config(shape, layers, SHAPES)
    check_plugin()
    ptxas = find_ptxas()
    records = []
    for spec in specs:
        mesh = mesh_for(spec)
        sds = functools.partial(_abstract, NamedSharding(mesh, P()))
        with bk.targeting_gpu(mesh.abstract_mesh):
            for batch in batches:
                cases = kernel_cases(cfg, batch, DTYPES[dtype], sds,
                                     pack_weights=batch == batches[0])
                if programs:
                    cases += program_cases(cfg, batch, DTYPES[dtype], sds)
                done = []
                for case in cases:
                    rec = dict(gpu=spec.name, device_kind=spec.device_kind, shape=shape,
                               layers=cfg.num_hidden_layers, dtype=dtype, batch=batch,
                               **compile_case(case, spec, ptxas))
                    if case.live is not None and rec["compiled"]:
                        for frac in ACTIVE_FRACTIONS:
                            live = case.live(math.ceil(frac * cfg.intermediate_size))
                            rec[f"live_per_sm_{round(frac * 100)}"] = round(live / spec.sms, 2)
                    if rec["kind"] == "kernel":
                        log(format_row(rec))
                    done.append(rec)
                programs_done = [r for r in done if r["kind"] == "program"]
                if programs_done:
                    launches_per_layer(cfg, shape, batch, DTYPES[dtype], sds, spec, ptxas,
                                       programs_done)
                    for rec in programs_done:
                        log(format_row(rec))
                records += done
    return records


def failures(records: list[dict]) -> list[str]:
    """What makes the report fail, per Pallas kernel: a compile error, a spilled byte (at
    `PRESSURE_OPTION`: a spill the registers force, not one ptxas chooses for occupancy), more than
    MAX_REGISTERS registers, or (at the shapes of real models, `TARGET_SHAPES`) fewer than
    MIN_LIVE_PER_SM programs with work per SM at 10% active. XLA's own fusions are XLA's choice:
    listed in a program's `xla_spills`, not a failure."""
    out = []
    for r in records:
        what = f"{r['gpu']} {r['name']} batch {r['batch']}: "
        if not r["compiled"]:
            out.append(what + str(r["error"]))
            continue
        if r["pressure_spill_bytes"]:
            out.append(what + f"{r['pressure_spill_bytes']} spill bytes ({PRESSURE_OPTION})")
        if r["kind"] == "kernel" and (r["registers"] or 0) > MAX_REGISTERS:
            out.append(what + f"{r['registers']} registers (at most {MAX_REGISTERS})")
        live = r.get("live_per_sm_10")
        if r["shape"] in TARGET_SHAPES and live is not None and live < MIN_LIVE_PER_SM:
            out.append(what + f"{live} live programs per SM at 10% active "
                       f"(at least {MIN_LIVE_PER_SM})")
    per_layer = {(r["gpu"], r["batch"], r["name"]): r.get("launches_per_layer") for r in records}
    for (gpu, batch, name), sparse in per_layer.items():
        dense = per_layer.get((gpu, batch, "generate_dense"))
        if name == "generate_sparse" and None not in (sparse, dense) and (
                sparse > dense + MAX_EXTRA_LAUNCHES):
            out.append(f"{gpu} generate_sparse batch {batch}: the decode step launches {sparse:g} "
                       f"a layer, dense {dense:g} (at most dense + {MAX_EXTRA_LAUNCHES})")
    return out


HEADER = (f"{'gpu':<13}{'batch':>5}  {'name':<24}{'ok':>3}{'regs':>6}{'spill':>6}"
          f"{'grid':>16}{'thr':>5}{'smem':>7}{'res/SM':>7}{'live/SM 5%':>11}{'10%':>7}{'20%':>7}")


def format_row(r: dict) -> str:
    """One table row (the header is `HEADER`)."""
    if not r["compiled"]:
        return f"{r['gpu']:<13}{r['batch']:>5}  {r['name']:<24}  no  {r['error']}"
    cell = lambda v: "-" if v is None else str(v)  # noqa: E731
    grid = "x".join(map(str, r["grid"])) if r["grid"] else f"{r['kernels']} kernels"
    if r.get("launches_per_layer") is not None:
        grid = f"{r['kernels']}k {r['launches_per_layer']:g}/layer"
    # default level / level 10, when ptxas's occupancy heuristic spilled what pressure does not
    spill = cell(r["spill_bytes"])
    if r.get("pressure_spill_bytes") not in (None, r["spill_bytes"]):
        spill = f"{r['spill_bytes']}/{r['pressure_spill_bytes']}"
    return (f"{r['gpu']:<13}{r['batch']:>5}  {r['name']:<24}{'yes':>3}{cell(r['registers']):>6}"
            f"{spill:>6}{grid:>16}{cell(r['threads']):>5}"
            f"{cell(r['shared_bytes']):>7}{cell(r.get('resident_per_sm')):>7}"
            f"{cell(r.get('live_per_sm_5')):>11}{cell(r.get('live_per_sm_10')):>7}"
            f"{cell(r.get('live_per_sm_20')):>7}")
