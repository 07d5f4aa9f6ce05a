"""A 7B model end to end: make it, convert it, load it, generate; time and peak memory of each.

Writes a checkpoint shaped exactly like SparseLLM/prosparse-llama-2-7b (its config.json field for
field: `sparsellama`, `SparseLlamaForCausalLM`, FATReLU with threshold 0.01, the custom-code
`auto_map`, 32 layers, bfloat16, two safetensors shards with an index; random weights), then runs
each stage in a fresh process and reports its wall time, peak RSS (the kernel's VmHWM) and bytes
written to disk (/proc/self/io):
  convert      `sparseinfer-convert HF OUT`
  load         `load(OUT, mesh=None)`, then a 4-token greedy `generate` (`--mode`), peak RSS
               after each, against the checkpoint's bytes (target: at most 1.15x on the CPU)
  load-hf      the same from the HF folder (converted array by array), with --hf
`--layers N` keeps the 7B widths with fewer layers (develop with 4; 32 needs ~28 GB of disk and
~15 GB of RAM). Figures are for the machine it runs on; say which when you quote them.

  python benchmarks/scale.py --layers 4 --json scale.json
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from sparseinfer_jax.io import tensorfiles  # noqa: E402

GiB = 2**30
# SparseLLM/prosparse-llama-2-7b's config.json (num_hidden_layers is --layers).
PROSPARSE_7B = {
    "_name_or_path": "SparseLLM/prosparse-llama-2-7b",
    "architectures": ["SparseLlamaForCausalLM"],
    "auto_map": {
        "AutoConfig": "configuration_sparsellama.SparseLlamaConfig",
        "AutoModel": "modeling_sparsellama.SparseLlamaModel",
        "AutoModelForCausalLM": "modeling_sparsellama.SparseLlamaForCausalLM",
    },
    "bos_token_id": 1,
    "eos_token_id": 2,
    "hidden_act": "fatrelu",
    "hidden_act_param": 0.01,
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 11008,
    "max_position_embeddings": 4096,
    "model_type": "sparsellama",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 32,
    "pad_token_id": 0,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": None,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.31.0",
    "use_cache": True,
    "vocab_size": 32000,
}
BF16 = tensorfiles.DTYPES["BF16"]


def _header(specs: dict[str, tuple[int, ...]]) -> bytes:
    """The safetensors header of bfloat16 tensors of these `{name: shape}`, data in that order."""
    header, offset = {}, 0
    for name, shape in specs.items():
        size = int(np.prod(shape, dtype=np.int64)) * BF16.itemsize
        header[name] = {"dtype": "BF16", "shape": list(shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format aligns the data to 8 bytes
    return len(raw).to_bytes(8, "little") + raw


def write_shard(path: str, specs: dict[str, tuple[int, ...]], tensors) -> int:
    """Writes one safetensors file, streaming: the header from the shapes, then each tensor of
    `tensors` (in the order of `specs`) with plain `write`, so a 7B shard never sits in memory.
    Returns the file's bytes."""
    with open(path, "xb") as f:
        f.write(_header(specs))
        for name, x in zip(specs, tensors, strict=True):
            assert x.shape == specs[name] and x.dtype == BF16, name
            f.write(memoryview(np.ascontiguousarray(x).reshape(-1).view(np.uint8)))
        return f.tell()


def hf_tensors(cfg: dict) -> list[tuple[str, tuple[int, ...]]]:
    """(HF name, shape) of every tensor, in the order HF shards them."""
    d, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    out = [("model.embed_tokens.weight", (v, d))]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out += [(p + f"self_attn.{n}_proj.weight", (d, d)) for n in "qkvo"]
        out += [(p + "mlp.gate_proj.weight", (f, d)), (p + "mlp.up_proj.weight", (f, d)),
                (p + "mlp.down_proj.weight", (d, f)), (p + "input_layernorm.weight", (d,)),
                (p + "post_attention_layernorm.weight", (d,))]
    return out + [("model.norm.weight", (d,)), ("lm_head.weight", (v, d))]


def random_bf16(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Random bfloat16 of magnitude 2^-7..2^-6 and random sign, straight from random bits (a
    normal draw of 7B values would take minutes)."""
    bits = rng.integers(0, 2**16, size=shape, dtype=np.uint16)
    return ((bits & 0x807F) | 0x3C00).view(BF16)


def make_checkpoint(folder: str, layers: int, seed: int = 0) -> int:
    """Writes the HF folder (two shards + index), streaming; returns its bytes."""
    cfg = {**PROSPARSE_7B, "num_hidden_layers": layers}
    os.makedirs(folder)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    tensors = hf_tensors(cfg)
    half = len(tensors) // 2
    rng = np.random.default_rng(seed)
    weight_map, total = {}, 0
    for k, part in enumerate((tensors[:half], tensors[half:])):
        file = f"model-{k + 1:05d}-of-00002.safetensors"
        specs = dict(part)
        tensors = (np.ones(shape, BF16) if name.endswith("norm.weight")
                   else random_bf16(rng, shape) for name, shape in part)
        total += write_shard(os.path.join(folder, file), specs, tensors)
        weight_map.update(dict.fromkeys(specs, file))
    with open(os.path.join(folder, tensorfiles.INDEX_FILE), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return total


# Each stage runs in a fresh process; at exit it prints its peak RSS and bytes written as JSON.
PRELUDE = """
import atexit, json, os, sys, time
def _report():
    status = open("/proc/self/status").read()
    io = dict(line.split(": ") for line in open("/proc/self/io").read().splitlines())
    cpu = os.times()
    print("STAGE" + json.dumps({"vmhwm": int(status.split("VmHWM:")[1].split()[0]) * 1024,
                                "write_bytes": int(io["write_bytes"]),
                                "cpu_s": cpu.user + cpu.system}), file=sys.stderr)
atexit.register(_report)
"""
CONVERT = PRELUDE + """
from convert.cli import main
# Random weights have nothing to calibrate: a fixed alpha marks the checkpoint as set on purpose,
# so neither the converter nor a sparse-mode load calibrates it (that is not what is measured).
status = main([*sys.argv[1:3], "--alpha", "1.0"])
sys.exit(status)
"""
LOAD = PRELUDE + """
import numpy as np
t0 = time.perf_counter()
from sparseinfer_jax import load, generate
model, _ = load(sys.argv[1], mesh=None, mode=sys.argv[2])
t1 = time.perf_counter()
status = open("/proc/self/status").read()
found = {"load_s": t1 - t0, "vmhwm_after_load": int(status.split("VmHWM:")[1].split()[0]) * 1024}
if sys.argv[3] == "generate":
    ids = np.random.default_rng(0).integers(3, 32000, size=(1, 12)).tolist()
    result = generate(model, ids, max_new_tokens=4, stop_at_eos=False, timing=False)
    found["generate_s"] = time.perf_counter() - t1
    found["tokens"] = np.asarray(result.tokens).tolist()
print("STAGE" + json.dumps(found), file=sys.stderr)
"""
# One process of a job (jax.distributed from the environment, gloo collectives): loads OUT over
# the job's `model` mesh and reports the bytes it read while loading.
SHARED_LOAD = PRELUDE + """
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
from sparseinfer_jax import load
from sparseinfer_jax.io import checkpoint  # orbax too: imported before counting
from sparseinfer_jax.model.sharding import make_mesh
from sparseinfer_jax.runtime.distributed import initialize_distributed
def rchar():
    io = dict(line.split(": ") for line in open("/proc/self/io").read().splitlines())
    return int(io["rchar"])
initialize_distributed(600)
before, t0 = rchar(), time.perf_counter()
model, _ = load(sys.argv[1], mesh=make_mesh(1, jax.device_count()))
print("STAGE" + json.dumps({"load_s": time.perf_counter() - t0, "read": rchar() - before,
                            "process": jax.process_index()}), file=sys.stderr)
"""


def _found(stderr: str, seconds: float) -> dict:
    found = {"seconds": seconds}
    for line in stderr.splitlines():
        if line.startswith("STAGE"):
            found.update(json.loads(line[5:]))
    return found


def run_stage(script: str, args: list[str]) -> dict:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", script, *args], cwd=ROOT, capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": ROOT})
    if proc.returncode:
        sys.exit(f"stage {args} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return _found(proc.stderr, time.perf_counter() - start)


def run_job(script: str, args: list[str], processes: int) -> list[dict]:
    """`script` in `processes` processes of 2 CPU devices each, joined into one jax job."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.perf_counter()
    procs = [subprocess.Popen(
        [sys.executable, "-c", script, *args], cwd=ROOT, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu",
             "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
             "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
             "JAX_NUM_PROCESSES": str(processes), "JAX_PROCESS_ID": str(i)})
        for i in range(processes)]
    errs = [p.communicate()[1] for p in procs]
    for p, err in zip(procs, errs, strict=True):
        if p.returncode:
            sys.exit(f"job {args} failed ({p.returncode}):\n{err[-3000:]}")
    return [_found(err, time.perf_counter() - start) for err in errs]


def folder_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=32, help="decoder layers (7B: 32)")
    parser.add_argument("--mode", default="sparse", choices=("dense", "sparse"))
    parser.add_argument("--hf", action="store_true", help="also load the HF folder directly")
    parser.add_argument("--no-generate", action="store_true",
                        help="load only, skip the 4-token generate")
    parser.add_argument("--processes", type=int, default=0,
                        help="also load the checkpoint in a job of this many processes")
    parser.add_argument("--workdir", default=None, help="where to write (default: a temp folder)")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(dir=args.workdir) as work:
        src, out = os.path.join(work, "hf"), os.path.join(work, "ckpt")
        start = time.perf_counter()
        source_bytes = make_checkpoint(src, args.layers)
        result = {"layers": args.layers, "mode": args.mode, "source_bytes": source_bytes,
                  "make_s": time.perf_counter() - start}
        result["convert"] = run_stage(CONVERT, [src, out])
        result["checkpoint_bytes"] = folder_bytes(out)
        result["params_bytes"] = folder_bytes(os.path.join(out, "params"))
        then = "load" if args.no_generate else "generate"
        result["load"] = run_stage(LOAD, [out, args.mode, then])
        if args.hf:
            result["load_hf"] = run_stage(LOAD, [src, args.mode, then])
        if args.processes:
            result["processes"] = run_job(SHARED_LOAD, [out], args.processes)
    params = result["params_bytes"]
    result["load_peak_over_checkpoint"] = result["load"]["vmhwm"] / params
    print(f"{args.layers} layers of 7B shape, bf16: HF source {source_bytes / GiB:.2f} GiB, "
          f"made in {result['make_s']:.0f} s")
    c = result["convert"]
    print(f"convert   {c['seconds']:6.1f} s (CPU {c['cpu_s']:.1f} s)  peak RSS "
          f"{c['vmhwm'] / GiB:6.2f} GiB  wrote {c['write_bytes'] / GiB:6.2f} GiB (checkpoint "
          f"{result['checkpoint_bytes'] / GiB:.2f} GiB, weights {params / GiB:.2f} GiB: "
          f"{c['write_bytes'] / params:.3f}x the weights)")
    for key in ("load", "load_hf"):
        if key in result:
            r = result[key]
            line = (f"{key:<9} {r['load_s']:6.1f} s (stage CPU {r['cpu_s']:.1f} s)  peak RSS "
                    f"{r['vmhwm_after_load'] / GiB:6.2f} GiB "
                    f"({r['vmhwm_after_load'] / params:.3f}x the weights)")
            if "generate_s" in r:
                line += (f"; + generate 4 tokens ({args.mode}) {r['generate_s']:6.1f} s  peak RSS "
                         f"{r['vmhwm'] / GiB:6.2f} GiB ({r['vmhwm'] / params:.3f}x)")
            print(line)
    for r in result.get("processes", []):
        r["read_share"] = r["read"] / params
        print(f"process {r['process']} of {args.processes}: load {r['load_s']:.1f} s, read "
              f"{r['read'] / GiB:.2f} GiB = {r['read_share']:.3f} of the weights (target <= 0.6 "
              f"for 2: {'met' if r['read_share'] <= 0.6 else 'NOT met'})")
    # On a GPU the weights live on the device: host memory while loading is this process's
    # baseline plus the arrays in flight. On the CPU the same figure is peak RSS minus the weights.
    largest = max(int(np.prod(shape)) * 2 for _, shape in hf_tensors(
        {**PROSPARSE_7B, "num_hidden_layers": 1}))
    beyond = result["load"]["vmhwm_after_load"] - params
    result["load_host_beyond_weights"] = beyond
    print(f"host memory beyond the weights during load: {beyond / GiB:.2f} GiB (GPU bound: the "
          f"largest array {largest / GiB:.2f} GiB + 2 GiB): "
          f"{'met' if beyond <= largest + 2 * GiB else 'NOT met'}")
    what = "load" if args.no_generate else "load + generate"
    verdict = "met" if result["load_peak_over_checkpoint"] <= 1.15 else "NOT met"
    print(f"CPU target ({what} <= 1.15x the checkpoint's {params / GiB:.2f} GiB of weights): "
          f"{result['load_peak_over_checkpoint']:.3f}x, {verdict}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
