"""Peak host memory of `sparseinfer-convert` against the size of the checkpoint it converts.

Writes a random Llama checkpoint (float32 safetensors, one shard per layer, no torch), converts it
in a subprocess while polling that process's memory, and reports:
  peak RSS      the kernel's high-water mark (VmHWM) of the converter process: every resident
                page, file-backed ones included (tensors are read and written with plain
                read/write, so few are);
  peak anon     polled RSS minus file-backed/shared pages: the memory the conversion holds;
each also minus the baseline of `sparseinfer-convert --help` (the imports).

  python benchmarks/convert_memory.py --size-mb 900 --json convert_memory.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import psutil
from safetensors.numpy import save_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MiB = 2**20


def write_checkpoint(folder: str, *, size_mb: float, hidden: int, intermediate: int, vocab: int,
                     seed: int = 0) -> dict:
    """A random float32 LlamaForCausalLM folder of about `size_mb` MiB; returns its config."""
    per_layer = 4 * hidden * hidden + 3 * hidden * intermediate + 2 * hidden
    outer = 2 * vocab * hidden + hidden
    layers = max(1, math.ceil((size_mb * MiB / 4 - outer) / per_layer))
    heads = hidden // 128
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "relu",
              "hidden_size": hidden, "intermediate_size": intermediate, "vocab_size": vocab,
              "num_hidden_layers": layers, "num_attention_heads": heads,
              "num_key_value_heads": heads, "max_position_embeddings": 2048, "rms_norm_eps": 1e-6,
              "tie_word_embeddings": False, "torch_dtype": "float32"}
    os.makedirs(folder)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)
    rng = np.random.default_rng(seed)

    def rand(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape, dtype=np.float32) * 0.02

    shards = [{"model.embed_tokens.weight": rand(vocab, hidden)}]
    for i in range(layers):
        p = f"model.layers.{i}."
        shards.append({
            p + "input_layernorm.weight": np.ones(hidden, np.float32),
            p + "post_attention_layernorm.weight": np.ones(hidden, np.float32),
            **{p + f"self_attn.{n}_proj.weight": rand(hidden, hidden) for n in "qkvo"},
            p + "mlp.gate_proj.weight": rand(intermediate, hidden),
            p + "mlp.up_proj.weight": rand(intermediate, hidden),
            p + "mlp.down_proj.weight": rand(hidden, intermediate),
        })
    shards.append({"model.norm.weight": np.ones(hidden, np.float32),
                   "lm_head.weight": rand(vocab, hidden)})
    weight_map = {}
    for k, tensors in enumerate(shards):
        file = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(tensors, os.path.join(folder, file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, file))
        shards[k] = None  # free the shard before generating the next one
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    return config


def folder_mib(path: str) -> float:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs) / MiB


# Runs the converter CLI, then prints the kernel's peak RSS of this process (VmHWM, kB) last.
WRAPPER = """
import atexit, sys
def hwm():
    status = open("/proc/self/status").read()
    print("VmHWM", status.split("VmHWM:")[1].split()[0], file=sys.stderr)
atexit.register(hwm)
from convert.cli import main
sys.exit(main(sys.argv[1:]))
"""


def run_polled(cli_args: list[str]) -> dict:
    """Runs the converter CLI with `cli_args`, polling its RSS and anonymous memory every 10 ms."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", WRAPPER, *cli_args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    ps = psutil.Process(proc.pid)
    peak_rss = peak_anon = 0
    while proc.poll() is None:
        try:
            m = ps.memory_info()
        except psutil.NoSuchProcess:
            break
        peak_rss, peak_anon = max(peak_rss, m.rss), max(peak_anon, m.rss - m.shared)
        time.sleep(0.01)
    out, err = proc.communicate()
    if proc.returncode:
        sys.exit(f"{cli_args} failed:\n{err.decode()[-3000:]}")
    hwm_kb = int(err.decode().split("VmHWM")[-1].split()[0])
    return {"seconds": time.perf_counter() - start, "peak_rss_mib": peak_rss / MiB,
            "peak_anon_mib": peak_anon / MiB, "vmhwm_mib": hwm_kb / 1024,
            "stdout": out.decode().strip()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mb", type=float, default=900, help="source checkpoint size (MiB)")
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5504)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--workdir", default=None, help="where to write (default: a temp folder)")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(dir=args.workdir) as work:
        src, out = os.path.join(work, "hf"), os.path.join(work, "out")
        config = write_checkpoint(src, size_mb=args.size_mb, hidden=args.hidden,
                                  intermediate=args.intermediate, vocab=args.vocab)
        baseline = run_polled(["--help"])
        run = run_polled([src, out, "--dtype", args.dtype])
        result = {
            "layers": config["num_hidden_layers"], "hidden": args.hidden,
            "intermediate": args.intermediate, "vocab": args.vocab, "dtype": args.dtype,
            "source_mib": folder_mib(src), "output_mib": folder_mib(out),
            "import_baseline": {k: v for k, v in baseline.items() if k != "stdout"},
            "convert": run,
        }
    for key in ("peak_rss_mib", "peak_anon_mib", "vmhwm_mib"):
        result[key.replace("_mib", "_over_baseline_mib")] = run[key] - baseline[key]
    ratio = result["peak_anon_over_baseline_mib"] / result["source_mib"]
    result["anon_over_baseline_per_source"] = ratio
    print(f"source {result['source_mib']:.0f} MiB ({result['layers']} layers, float32) -> "
          f"{args.dtype} {result['output_mib']:.0f} MiB in {run['seconds']:.1f} s; "
          f"peak RSS {run['vmhwm_mib']:.0f} MiB, peak anon {run['peak_anon_mib']:.0f} MiB "
          f"(import baseline {baseline['vmhwm_mib']:.0f} / {baseline['peak_anon_mib']:.0f}); "
          f"anon above baseline = {100 * ratio:.1f}% of the source")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
