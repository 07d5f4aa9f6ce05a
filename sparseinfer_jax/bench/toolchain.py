"""What the GPU compile report needs around XLA: the CUDA plugin and ptxas found, a compile-only
device of a GPU spec, and what a compile leaves behind read back (launches from XLA's thunk
sequence, registers and spills from `ptxas -v` on the dumped PTX)."""

from __future__ import annotations

import glob
import importlib.util
import math
import os
import re
import shutil
import subprocess

import jax

from sparseinfer_jax.bench.gpu_spec import GpuSpec
from sparseinfer_jax.errors import UserError

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
    """A one-device mesh of compile-only devices of `spec`'s kind (UserError when XLA cannot read
    the spec)."""
    from jax.experimental import topologies

    try:
        topo = topologies.get_topology_desc(platform="cuda", topology="1x1x1",
                                            target_config=spec.text)
    except Exception as e:  # noqa: BLE001 - XLA's parse error, whatever its type
        first = (str(e).strip() or type(e).__name__).splitlines()[0][:200]
        raise UserError(f"XLA cannot read GPU spec '{spec.name}' ({first}): start from a file in "
                        "sparseinfer_jax/bench/gpu_specs.") from None
    return topologies.make_mesh(topo, (1,), ("x",))


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


def _block_launches(lines: list, start: int, depth: int) -> tuple[int, int]:
    """(launches, next index) of the thunks indented deeper than `depth` from `lines[start]`:
    each thunk that does work counts 1, a conditional its biggest branch (one branch runs per
    step), any other container what it holds."""
    count, i = 0, start
    while i < len(lines) and len(lines[i].group(1)) > depth:
        m = lines[i]
        inner_depth = len(m.group(1))
        if m.group(2) == "kConditional":
            i, branches = i + 1, []
            while i < len(lines) and len(lines[i].group(1)) > inner_depth:
                n, i = _block_launches(lines, i + 1, len(lines[i].group(1)))  # a `branch:` label
                branches.append(n)
            count += max(branches, default=0)
        elif m.group(2):
            count += m.group(2) not in _CONTAINERS
            i += 1
        else:  # a label (`body:`, `condition:`) of a container already counted
            n, i = _block_launches(lines, i + 1, inner_depth)
            count += n
    return count, i


def loop_launches(text: str) -> int | None:
    """Launches in one run of the biggest loop body of a thunk sequence (`*thunk_sequence.txt`):
    every thunk that does work (a kernel, a library call, a copy), of each conditional the branch
    that launches most (one runs); None when there is no loop. In a `generate` program that loop
    is the decode step."""
    best = None
    lines = [m for m in map(_THUNK_LINE.match, text.splitlines()) if m]
    for i, m in enumerate(lines):
        if m.group(3) == "body":
            count, _ = _block_launches(lines, i + 1, len(m.group(1)))
            best = count if best is None else max(best, count)
    return best


def _ptxas(ptxas: str, path: str) -> str:
    """`ptxas -v` on a PTX file for its own target; its report (stderr).

    XLA compiles PTX in-process with its own (possibly newer) PTX compiler; when this ptxas is
    older than the PTX's ISA version, the file is assembled again as the newest version it reads
    (the kernels use no newer instruction; if one did, ptxas says so and the case fails).
    """
    with open(path) as f:
        ptx = f.read()
    target = re.search(r"^\.target (\w+)", ptx, re.M).group(1)
    cmd = [ptxas, "-v", f"-arch={target}", "-o", os.devnull]
    run = subprocess.run([*cmd, path], capture_output=True, text=True)
    older = re.search(r"Unsupported \.version [\d.]+; current version is '([\d.]+)'", run.stderr)
    if older:
        ptx = re.sub(r"^\.version [\d.]+", f".version {older.group(1)}", ptx, count=1, flags=re.M)
        run = subprocess.run([*cmd, "-"], input=ptx, capture_output=True, text=True)
    if run.returncode:
        raise RuntimeError(f"ptxas failed on {os.path.basename(path)}: {run.stderr.strip()}")
    return run.stderr


def ptxas_usage(dump: str, ptxas: str) -> dict[str, dict]:
    """Per entry function of the dumped PTX: {"registers", "spill_bytes"} from `ptxas -v`."""
    usage: dict[str, dict] = {}
    for path in glob.glob(os.path.join(dump, "*.ptx")):
        if os.path.getsize(path) == 0:
            continue
        name = None
        for line in _ptxas(ptxas, path).splitlines():
            if m := re.search(r"Compiling entry function '(\S+)'", line):
                name = m.group(1)
                usage[name] = dict(registers=0, spill_bytes=0)
            elif name and (m := re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads",
                                          line)):
                usage[name]["spill_bytes"] = int(m.group(1)) + int(m.group(2))
            elif name and (m := re.search(r"Used (\d+) registers", line)):
                usage[name]["registers"] = int(m.group(1))
    return usage
