"""Offline TPU compile report: the Pallas TPU (Mosaic) kernels and the dense decode program,
compiled for a TPU v5e or v6e on a machine without one (`sparseinfer compile-report --tpu`).

How. With `jax[tpu]` of jax's own version installed (it brings libtpu: the TPU compiler) and the
CPU as JAX's platform, `jax.experimental.topologies.get_topology_desc(topology_name="v5e:1x1",
platform="tpu")` gives compile-only TPU devices, and `jit(fn).trace(...).lower().compile()` runs
XLA's TPU compiler and Mosaic on abstract arguments (`ShapeDtypeStruct`s sharded over a mesh of
those devices: no weight is allocated). libtpu logs that it cannot tell the accelerator type; the
compile does not need it.

What a record holds: per Mosaic kernel in the compiled module, the VMEM it reserves (the custom
call's scoped VMEM in the optimised HLO: its buffers and temporaries; XLA may move a small
operand, such as the sign bits of a one-kernel program, into VMEM beforehand, and the kernel's
pipeline buffers shrink then), and every XLA op whose result is as large as a weight
(`weight_copies`): a re-layout of a whole weight before a kernel that reads a tenth of it. Such
a copy, or a failed compile, fails the report. The kernels' work follows the active count at run
time, so one compile serves every sparsity; the record adds the bytes a layer reads at
`ACTIVE` of the neurons active for scale. A `generate` program's record holds its decode loop's
weight-sized ops instead (`loop_ops`, in the loop or hoisted out of it: any fails the report) and
the bytes XLA's own cost analysis says the program accesses (`bytes_accessed`); a sparse program
accessing as many bytes as the dense one fails it too.

The programs compiled are `PROGRAM_MODES`, each with the model's MLP weights in the TPU kernels'
layout, as `load` leaves them on a TPU (`sparseinfer_jax.model.layout`).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import math
import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from pallas_kernels import pack
from pallas_kernels.tpu.common import targeting_tpu
from pallas_kernels.tpu.gather import tpu_gate, tpu_up_down
from pallas_kernels.tpu.layer import sparse_mlp_layer_mosaic
from pallas_kernels.tpu.predict import tpu_votes
from sparseinfer_jax.bench.compile_cases import program_cases
from sparseinfer_jax.bench.loop_ops import failures as loop_ops_failures
from sparseinfer_jax.bench.loop_ops import loop_ops, thresholds
from sparseinfer_jax.bench.shapes import shape_config
from sparseinfer_jax.errors import UserError
from sparseinfer_jax.model.config import LlamaConfig
from sparseinfer_jax.model.dtypes import DTYPES

# Colab's TPU runtimes, as jax's topology names.
TOPOLOGIES = {"v5e": "v5e:1x1", "v6e": "v6e:1x1"}
DEFAULT_TPUS = ("v5e", "v6e")
ACTIVE = 0.1  # the fraction of neurons for the bytes-read figure
# The `generate` programs compiled, by MLP mode (`compile_cases.program_cases`), on the path
# auto takes on a TPU (`backend.choose`), named because here the local CPU would decide auto.
PROGRAM_MODES = ("dense", "sparse")
PROGRAM_BACKEND = "mosaic"
FATRELU_THRESHOLD = 0.1


def check_libtpu() -> None:
    """UserError unless libtpu (jax[tpu]) is installed: it carries XLA's TPU compiler."""
    if importlib.util.find_spec("libtpu") is None:
        raise UserError(f'libtpu is not installed: pip install "jax[tpu]=={jax.__version__}" '
                        "(Python >= 3.10, Linux) to compile for a TPU.")


def check_tpu(name: str) -> None:
    """UserError unless `name` is a key of TOPOLOGIES."""
    if name not in TOPOLOGIES:
        raise UserError(f"--tpu must be a comma list of {', '.join(TOPOLOGIES)}, got '{name}'.")


def tpu_mesh(name: str) -> jax.sharding.Mesh:
    """A one-device mesh of compile-only devices of TPU `name` (a key of TOPOLOGIES)."""
    from jax.experimental import topologies

    topo = topologies.get_topology_desc(topology_name=TOPOLOGIES[name], platform="tpu")
    return topologies.make_mesh(topo, (1,), ("x",))


@dataclasses.dataclass(frozen=True)
class Case:
    """One thing to compile: `fn(*args)`; `kernels` the Mosaic kernels it must hold."""

    name: str
    kind: str
    fn: Callable
    args: tuple
    kernels: tuple[str, ...] = ()


def kernel_cases(cfg: LlamaConfig, batch: int, dtype, sds: Callable) -> list[Case]:
    """Every TPU kernel, and the whole layer op, at one layer's shapes. Weights are given as the
    kernels gather them (`tpu_rows`: bfloat16 as uint32 column pairs)."""
    d, f = cfg.hidden_size, cfg.intermediate_size
    x = sds((batch, d), dtype)
    w = sds((f, -(-d // 2)), jnp.uint32) if dtype == jnp.bfloat16 else sds((f, d), dtype)
    ids, count = sds((f,), jnp.int32), sds((), jnp.int32)
    bits, alpha = sds((f, pack.num_words(d)), jnp.uint32), sds((), jnp.float32)
    part = functools.partial
    return [
        Case("sign_votes", "kernel", part(tpu_votes, predictor="sign"), (x, bits, alpha),
             ("sign_votes",)),
        Case("signmag_votes", "kernel", part(tpu_votes, predictor="signmag"), (x, bits, alpha),
             ("signmag_votes",)),
        Case("gate_relu", "kernel", part(tpu_gate, activation="relu"), (x, w, ids, count),
             ("tpu_gate",)),
        Case("gate_fatrelu", "kernel",
             part(tpu_gate, activation="fatrelu", threshold=FATRELU_THRESHOLD),
             (x, w, ids, count), ("tpu_gate",)),
        Case("up_down", "kernel", tpu_up_down,
             (x, sds((batch, f), jnp.float32), w, w, ids, count), ("tpu_up_down",)),
        Case("layer_sign", "layer", sparse_mlp_layer_mosaic, (x, w, w, w, bits, alpha),
             ("sign_votes", "tpu_gate", "tpu_up_down")),
    ]


_INSTR = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (\w+)\[([\d,]*)\]\S* (\S+?)\(")
_MOSAIC = re.compile(r"^\s*(?:ROOT )?%([A-Za-z_]+)(?:\.\d+)? = .*custom_call_target=\"tpu_custom_"
                     r"call\".*?\"used_scoped_memory_configs\":\[(.*?)\]")
_VMEM = re.compile(r'\{"memory_space":"1","offset":"\d+","size":"(\d+)"\}')
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4,
          "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8}


def mosaic_vmem(hlo: str) -> dict[str, int]:
    """Per Mosaic kernel of an optimised HLO module: its scoped VMEM bytes (the largest over its
    calls)."""
    out: dict[str, int] = {}
    for line in hlo.splitlines():
        if m := _MOSAIC.match(line):
            size = sum(int(s) for s in _VMEM.findall(m.group(2)))
            out[m.group(1)] = max(out.get(m.group(1), 0), size)
    return out


def large_xla_ops(hlo: str, at_least: int) -> list[str]:
    """XLA ops of an optimised HLO module (not parameters, bitcasts or Mosaic kernels) whose
    result holds at least `at_least` bytes: `name opcode bytes`."""
    out = []
    for line in hlo.splitlines():
        m = _INSTR.match(line)
        if not m or m.group(4) in ("parameter", "bitcast", "custom-call", "get-tuple-element"):
            continue
        dtype, dims = m.group(2), m.group(3)
        size = _BYTES.get(dtype, 4) * math.prod(int(v) for v in dims.split(",") if v)
        if size >= at_least:
            out.append(f"{m.group(1)} {m.group(4)} {size}")
    return out


def layer_bytes(cfg: LlamaConfig, dtype, active: float) -> int:
    """Bytes one sparse MLP layer reads with `active` of its neurons candidates, all firing: the
    sign bits, then a gate, an up and a down row per active neuron."""
    d, f = cfg.hidden_size, cfg.intermediate_size
    row = d * jnp.dtype(dtype).itemsize
    return f * pack.num_words(d) * 4 + 3 * math.ceil(active * f) * row


def compile_case(case: Case, weight_bytes: int, loop: dict[str, int]) -> dict:
    """Compiles one case for the TPU of the mesh in use; the record's fields (`loop`: the
    thresholds of `loop_ops` for a program's decode loop)."""
    rec: dict[str, Any] = dict(name=case.name, kind=case.kind, compiled=False, error=None,
                               vmem_bytes=None, weight_copies=None, temp_bytes=None)
    try:
        compiled = jax.jit(case.fn).trace(*case.args).lower().compile()
        hlo = compiled.as_text()
    except Exception as e:  # noqa: BLE001 - any compiler error is the report's finding
        rec["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300]}"
        return rec
    rec["compiled"] = True
    rec["vmem_bytes"] = mosaic_vmem(hlo)
    rec["weight_copies"] = large_xla_ops(hlo, weight_bytes) if case.kind != "program" else []
    rec["temp_bytes"] = compiled.memory_analysis().temp_size_in_bytes
    if case.kind == "program":
        rec["loop_ops"] = loop_ops(compiled, loop)
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost  # a list of one on older jax
        rec["bytes_accessed"] = int(cost["bytes accessed"])
    missing = set(case.kernels) - set(rec["vmem_bytes"])
    if missing:
        rec["error"] = f"compiled without its Mosaic kernels {sorted(missing)}"
    return rec


def run(tpus: list[str], shape: str, batches: list[int], *, layers: int | None = None,
        dtype: str = "bfloat16", programs: bool = True,
        log: Callable[[str], None] = print) -> list[dict]:
    """Compiles every case for every TPU and batch; returns the records."""
    for name in tpus:
        check_tpu(name)
    if not batches or min(batches) < 1:
        raise UserError(f"--batches must be positive integers, got {batches}.")
    cfg = shape_config(shape, layers)
    check_libtpu()
    meshes = {name: tpu_mesh(name) for name in tpus}
    weight_bytes = cfg.intermediate_size * cfg.hidden_size * jnp.dtype(DTYPES[dtype]).itemsize
    loop = thresholds(cfg, DTYPES[dtype])
    records = []
    for name, mesh in meshes.items():
        sds = lambda shape, dt, mesh=mesh: jax.ShapeDtypeStruct(  # noqa: E731
            shape, dt, sharding=NamedSharding(mesh, P()))
        with targeting_tpu():
            for batch in batches:
                cases = kernel_cases(cfg, batch, DTYPES[dtype], sds)
                if programs:
                    cases += [Case(c.name, c.kind, c.fn, c.args) for c in program_cases(
                        cfg, batch, DTYPES[dtype], sds, modes=PROGRAM_MODES,
                        backend=PROGRAM_BACKEND)]
                for case in cases:
                    rec = dict(tpu=name, device_kind=mesh.devices.flat[0].device_kind,
                               shape=shape, layers=cfg.num_hidden_layers, dtype=dtype,
                               batch=batch, layer_bytes_at_active=layer_bytes(
                                   cfg, DTYPES[dtype], ACTIVE),
                               **compile_case(case, weight_bytes, loop))
                    records.append(rec)
                    log(format_row(rec))
    return records


def failures(records: list[dict]) -> list[str]:
    """What fails the report: a compile error, a case without its Mosaic kernels, an XLA op
    as large as a weight beside the kernels (a re-layout of a whole weight), a decode loop that
    copies a weight or widens its rows (`loop_ops`), or a sparse program that accesses no fewer
    bytes than the dense one (XLA's cost analysis)."""
    out = []
    for r in records:
        what = f"{r['tpu']} {r['name']} batch {r['batch']}: "
        if r["error"]:
            out.append(what + str(r["error"]))
        elif r["weight_copies"]:
            out.append(what + f"weight-sized XLA ops {r['weight_copies']}")
    out += loop_ops_failures(records, "tpu")
    accessed = {(r["tpu"], r["batch"], r["name"]): r.get("bytes_accessed") for r in records}
    for (tpu, batch, name), sparse in accessed.items():
        dense = accessed.get((tpu, batch, "generate_dense"))
        if name == "generate_sparse" and None not in (sparse, dense) and sparse >= dense:
            out.append(f"{tpu} generate_sparse batch {batch}: accesses {sparse / 1e9:.2f} GB, "
                       f"the dense program {dense / 1e9:.2f} GB (XLA's cost analysis)")
    return out


HEADER = (f"{'tpu':<5}{'batch':>5}  {'name':<16}{'ok':>3}  {'VMEM KiB per Mosaic kernel':<52}"
          f"copies  {'GB accessed':>11}")


def format_row(r: dict) -> str:
    """One table row (the header is `HEADER`)."""
    if not r["compiled"]:
        return f"{r['tpu']:<5}{r['batch']:>5}  {r['name']:<16}  no  {r['error']}"
    vmem = ", ".join(f"{k} {v / 1024:.0f}" for k, v in sorted(r["vmem_bytes"].items())) or "-"
    copies = len(r["loop_ops"]) if "loop_ops" in r else len(r["weight_copies"])
    accessed = f"{r['bytes_accessed'] / 1e9:.2f}" if "bytes_accessed" in r else "-"
    return (f"{r['tpu']:<5}{r['batch']:>5}  {r['name']:<16}{'yes':>3}  {vmem:<52}"
            f"{copies:>6}  {accessed:>11}")
