"""Compile time of `generate` vs depth: cold, and from JAX's persistent compilation cache.

The decoder layers are a Python loop over per-layer arrays (a scan over an `[L]` stack made XLA
copy every layer's weights, `layer_stack.py`), so XLA compiles every layer again and the compile
time grows linearly with depth, once per prompt/output bucket. The `sparseinfer` CLI turns JAX's
persistent compilation cache on (`cli.compile_cache_dir`), so a bucket compiles once per machine.

For each shape (random bfloat16 weights; 1b = TinyLlama-1.1B, 7b = Llama-2-7B) and depth, two fresh
processes run the same `generate` calls (8-token prompt -> bucket 16, 16 new tokens -> bucket 16,
dense then sparse) with one empty cache folder: the first compiles and fills it (cold), the second
finds the programs there (warm). `compile_s` is what `generate` reports: tracing, lowering and
compiling (or loading) the program. Also prints a linear fit per shape and its value at full
depth.

    python benchmarks/compile_depth.py [--depths 1b=2,4,8,22 7b=1,2,4] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile

import numpy as np

MODES = ("dense", "sparse")
FULL_DEPTH = {"1b": 22, "7b": 32}


def child(shape: str, layers: int, cache: str) -> dict:
    import jax

    jax.config.update("jax_compilation_cache_dir", cache)
    from sparseinfer_jax import generate
    from sparseinfer_jax.bench.shapes import random_model, shape_config

    model = random_model(shape_config(shape, layers), "bfloat16")
    out = {}
    for mode in MODES:
        r = generate(model, [[5] * 8], max_new_tokens=16, mode=mode, backend="xla",
                     stop_at_eos=False)
        out[mode] = {"compile_s": r.timing.compile_s,
                     "decode_ms": r.timing.decode_s_per_token * 1e3}
    return out


def _run(shape: str, layers: int, cache: str) -> dict:
    done = subprocess.run([sys.executable, __file__, "--child", shape, str(layers), cache],
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--depths", nargs="+", default=["1b=2,4,8,22", "7b=1,2,4"],
                   help="SHAPE=L1,L2,... per shape")
    p.add_argument("--json", default=None)
    p.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        shape, layers, cache = args.child
        print(json.dumps(child(shape, int(layers), cache)))
        return
    records = []
    print(f"{'shape':>5} {'layers':>6} {'mode':>6} {'cold s':>7} {'warm s':>7} {'cold/warm':>9} "
          f"{'decode ms cold':>14} {'warm':>6}")
    for item in args.depths:
        shape, _, depths = item.partition("=")
        for layers in (int(v) for v in depths.split(",")):
            with tempfile.TemporaryDirectory() as cache:
                cold, warm = _run(shape, layers, cache), _run(shape, layers, cache)
            for mode in MODES:
                c, w = cold[mode], warm[mode]
                records.append({"shape": shape, "layers": layers, "mode": mode,
                                "cold_s": c["compile_s"], "warm_s": w["compile_s"],
                                "cold_decode_ms": c["decode_ms"], "warm_decode_ms": w["decode_ms"]})
                print(f"{shape:>5} {layers:>6} {mode:>6} {c['compile_s']:>7.2f} "
                      f"{w['compile_s']:>7.2f} {c['compile_s'] / w['compile_s']:>9.1f} "
                      f"{c['decode_ms']:>14.1f} {w['decode_ms']:>6.1f}", flush=True)
    print("\nlinear fit, compile s = a + b * layers, and its value at full depth:")
    for shape in dict.fromkeys(r["shape"] for r in records):
        for mode in MODES:
            rows = [r for r in records if r["shape"] == shape and r["mode"] == mode]
            if len({r["layers"] for r in rows}) < 2:
                continue
            layers = np.asarray([r["layers"] for r in rows], float)
            for kind in ("cold_s", "warm_s"):
                b, a = np.polyfit(layers, [r[kind] for r in rows], 1)
                print(f"  {shape} {mode:>6} {kind[:-2]:>4}: {a:6.2f} + {b:5.3f} * L "
                      f"-> {a + b * FULL_DEPTH[shape]:6.1f} s at {FULL_DEPTH[shape]} layers")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=1)
            f.write("\n")


if __name__ == "__main__":
    main()
