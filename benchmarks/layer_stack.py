"""Does reading a layer's weights out of a stacked `[L, F, D]` array cost a copy?

The model stacks its decoder layers on a leading axis and runs them with `lax.scan` (one compiled
body, per-layer data as `[L]` arrays). Inside the scan each layer's weight is a dynamic slice of
the stack; if the backend materialises that slice before the matvec, every layer pays a copy of
its weights (a read and a write) on top of the read the matvec needs. This times one matvec per
layer, `x [1, D] @ W[l]^T` as the MLP does it, four ways:
  scan      lax.scan over the stacked array (what the model does);
  fori      fori_loop with a dynamic index into the stack;
  static    a Python loop with static slices W[l];
  separate  a Python loop over L separate arrays (no slicing at all);
and prints ms and GB/s of weight bytes read, medians of --repeats calls.

    python benchmarks/layer_stack.py [--layers 4 --rows 5632 --cols 2048 --dtype float32]
    python benchmarks/layer_stack.py --json out.json
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np

from sparseinfer_jax.bench.timing import time_calls

DIMS = (((1,), (1,)), ((), ()))


def _step(x, w):
    y = jax.lax.dot_general(x, w, DIMS, preferred_element_type=jnp.float32)
    return x + (y[:, : x.shape[1]] * 1e-9).astype(x.dtype)


def variants(layers: int):
    def scan(w, x):
        return jax.lax.scan(lambda x, wl: (_step(x, wl), None), x, w)[0]

    def fori(w, x):
        return jax.lax.fori_loop(0, layers, lambda i, x: _step(x, w[i]), x)

    def static(w, x):
        for i in range(layers):
            x = _step(x, w[i])
        return x

    def separate(ws, x):
        for w in ws:
            x = _step(x, w)
        return x

    return {"scan": scan, "fori": fori, "static": static, "separate": separate}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--rows", type=int, default=5632, help="F (TinyLlama-1.1B's intermediate)")
    p.add_argument("--cols", type=int, default=2048, help="D")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    dtype = jnp.dtype(args.dtype)
    stack = jax.random.normal(jax.random.key(0), (args.layers, args.rows, args.cols), dtype)
    parts = [stack[i] for i in range(args.layers)]
    x = jnp.ones((1, args.cols), dtype)
    nbytes = stack.size * dtype.itemsize
    records = []
    print(f"{jax.devices()[0].device_kind}: {args.layers} x [{args.rows}, {args.cols}] {dtype}")
    for name, fn in variants(args.layers).items():
        w = parts if name == "separate" else stack
        ms = float(np.median(time_calls(jax.jit(fn), w, x, repeats=args.repeats))) * 1e3
        records.append({"variant": name, "ms": ms, "gb_s": nbytes / ms / 1e6})
        print(f"{name:>9}: {ms:8.3f} ms  {nbytes / ms / 1e6:7.1f} GB/s")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(records, fh, indent=1)


if __name__ == "__main__":
    main()
