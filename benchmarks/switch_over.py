"""Where the XLA path's gathered MLP stops beating the dense one: sets the dense-fallback point.

For one layer of a named shape, times (median and min of `--repeats` calls after warm-up) the XLA
path's chunk loop (`chunk_loop.gate_xla` + `up_down_xla` with the dense fallback switched off,
every candidate taken as fired) for K = F/16, 2F/16, ..., F active neurons, against the dense MLP
matvec of the same layer. `chunk_loop.DENSE_ABOVE` should sit at the first K where the loop costs
as much as dense.

    python benchmarks/switch_over.py --shape 1b --dtype float32 --json switch.json
"""

from __future__ import annotations

import argparse
import json
import statistics

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.contract import activate, matmul, matmul_t
from pallas_kernels.xla.chunk_loop import gate_xla, up_down_xla
from sparseinfer_jax.bench.shapes import shape_config
from sparseinfer_jax.bench.timing import time_calls
from sparseinfer_jax.model.dtypes import DTYPES, STORED


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shape", default="1b")
    parser.add_argument("--dtype", default="float32", choices=STORED)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    cfg = shape_config(args.shape, 1)
    f, d = cfg.intermediate_size, cfg.hidden_size
    keys = jax.random.split(jax.random.key(0), 4)
    gate, up, down_t = (jax.random.normal(k, (f, d), DTYPES[args.dtype]) for k in keys[:3])
    x = jax.random.normal(keys[3], (1, d), DTYPES[args.dtype])

    def dense(x):
        h = activate(matmul_t(x, gate), "relu", 0.0) * matmul_t(x, up)
        return matmul(h, down_t)

    def chunked(x, idx, count):
        a = activate(gate_xla(x, gate, idx, count, dense_above=1.0), "relu", 0.0)
        a = jnp.where(jnp.arange(f) < count, a, 0.0)
        return up_down_xla(x, a, up, down_t, idx, count, dense_above=1.0)

    def stats(fn, *a):
        t = time_calls(jax.jit(fn), *a, repeats=args.repeats)
        return {"median_ms": statistics.median(t) * 1e3, "min_ms": min(t) * 1e3}

    rows = [{"k": f, "fraction": 1.0, "path": "dense", **stats(dense, x)}]
    print(f"dense MLP: {rows[0]['median_ms']:.3f} ms (min {rows[0]['min_ms']:.3f})")
    rng = np.random.default_rng(0)
    for sixteenths in range(1, 17):
        k = f * sixteenths // 16
        idx = np.zeros((f,), np.int32)
        idx[:k] = np.sort(rng.choice(f, k, replace=False))
        row = {"k": k, "fraction": sixteenths / 16, "path": "chunked",
               **stats(chunked, x, jnp.asarray(idx), jnp.int32(k))}
        rows.append(row)
        print(f"chunked K={k:>6} ({sixteenths:>2}/16): {row['median_ms']:.3f} ms "
              f"(min {row['min_ms']:.3f}), {row['median_ms'] / rows[0]['median_ms']:.2f} x dense")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
