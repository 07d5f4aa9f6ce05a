"""The MLP alone with cold caches: dense vs the sparse paths, per layer, over several layers.

`sparseinfer bench`'s kernel table times one layer's op again and again, so on a CPU with a large
last-level cache the few MB a sparse MLP gathers stay cached between calls and the sparse op looks
faster than it is in decoding. Here each call chains the MLP through `--layers` different layers
(x feeds the next layer), so every weight row comes from memory, as in a decode step. Prints
milliseconds per layer (median of `--repeats`) and each sparse path's ratio to dense.

    python benchmarks/cold_mlp.py --shape 1b --layers 8 --dtype float32 --active 0.1
"""

from __future__ import annotations

import argparse
import statistics

import jax
import jax.numpy as jnp
import numpy as np

import pallas_kernels as pk
from pallas_kernels.contract import activate, matmul, matmul_t
from sparseinfer_jax.bench.alphas import alpha_keeping
from sparseinfer_jax.bench.shapes import shape_config
from sparseinfer_jax.bench.timing import time_calls
from sparseinfer_jax.model.dtypes import DTYPES, STORED


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="1b")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--dtype", default="float32", choices=STORED)
    p.add_argument("--active", type=float, default=0.1)
    p.add_argument("--backend", default="auto")
    p.add_argument("--repeats", type=int, default=9)
    a = p.parse_args()
    cfg = shape_config(a.shape)
    d, f, dt = cfg.hidden_size, cfg.intermediate_size, DTYPES[a.dtype]
    keys = jax.random.split(jax.random.key(0), 3 * a.layers)
    w = [(0.02 * jax.random.normal(k, (f, d), jnp.float32)).astype(dt) for k in keys]
    layers = [dict(gate=w[3 * i], up=w[3 * i + 1], down_t=w[3 * i + 2],
                   bits=pk.pack_sign_bits(w[3 * i])) for i in range(a.layers)]
    x0 = jnp.asarray(np.random.default_rng(0).standard_normal((1, d)), dt)
    alpha = alpha_keeping(x0, layers[0]["bits"], a.active)  # layer 0's, for x0

    def dense(x, w):
        h = activate(matmul_t(x, w["gate"]), "relu", 0.0) * matmul_t(x, w["up"])
        return matmul(h.astype(x.dtype), w["down_t"])

    def sparse(x, w):  # the op the model calls
        return pk.sparse_mlp_layer(x, w["gate"], w["up"], w["down_t"], w["bits"], alpha,
                                   backend=a.backend)[0]

    def chained(mlp):
        def run(x, layers):
            for w in layers:  # each layer's input depends on the last layer's output
                x = x + (1e-3 * mlp(x, w)).astype(x.dtype)
            return x
        return jax.jit(run)

    print(f"{jax.devices()[0]}, {a.shape} MLP (D={d}, F={f}, {a.dtype}) x {a.layers} layers, "
          f"about {a.active:.0%} predicted active, {a.backend}")
    ms = {}
    for name, mlp in (("dense", dense), ("sparse", sparse)):
        t = statistics.median(time_calls(chained(mlp), x0, layers, repeats=a.repeats))
        ms[name] = t / a.layers * 1e3
        ratio = f"  {ms[name] / ms['dense']:.3f} of dense" if name != "dense" else ""
        print(f"{name:<10} {ms[name]:8.3f} ms a layer{ratio}", flush=True)


if __name__ == "__main__":
    main()
