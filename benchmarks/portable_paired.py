"""The portable sparse MLP against the XLA chunk loop and dense, paired, with cold caches.

Each path is one jitted function that chains the MLP through `--layers` different layers (x feeds
the next one, as in `cold_mlp.py`), so every weight row comes from memory as in a decode step.
The paths run in turn within each repeat (the order rotates), and each repeat gives one ratio per
pair, so a shared machine's drift between repeats cancels; the medians of those ratios are what to
read. Paths (`--paths`): dense, the model's dense MLP (`quant.float_dot`); xla, portable and
pallas = `sparse_mlp_layer` on that backend (the chunk loop, the bucketed XLA path, the Triton
kernels: a GPU only).

    python benchmarks/portable_paired.py --shape 1b --layers 8 --dtype float32 --active 0.1
"""

from __future__ import annotations

import argparse
import json
import statistics

import jax
import jax.numpy as jnp
import numpy as np

import pallas_kernels as pk
from pallas_kernels.contract import activate
from pallas_kernels.quant import float_dot as dot
from sparseinfer_jax.bench.alphas import alpha_keeping
from sparseinfer_jax.bench.shapes import DTYPES, shape_config
from sparseinfer_jax.bench.timing import time_calls

DTYPES = {**DTYPES, "float16": jnp.float16}


def layer_op(backend: str):
    """`sparse_mlp_layer` on `backend`: (out, computed) for one layer."""

    def mlp(x, w, alpha):
        out, counts = pk.sparse_mlp_layer(x, w["gate"], w["up"], w["down_t"], w["bits"], alpha,
                                          backend=backend)
        return out, counts[1]

    return mlp


def dense(x, w, alpha):
    h = activate(dot(x, w["gate"], 1), "relu", 0.0) * dot(x, w["up"], 1)
    return dot(h.astype(x.dtype), w["down_t"], 0).astype(x.dtype), jnp.int32(w["gate"].shape[0])


PATHS = {"dense": dense, "xla": layer_op("xla"), "portable": layer_op("portable"),
         "pallas": layer_op("pallas")}


def chained(mlp):
    """jit of the MLP through every layer: (final x, mean computed count a layer)."""

    def run(x, layers, alpha):
        computed = []
        for w in layers:  # each layer's input depends on the last layer's output
            out, count = mlp(x, w, alpha)
            x = x + (1e-3 * out).astype(x.dtype)
            computed.append(count)
        return x, jnp.mean(jnp.stack(computed).astype(jnp.float32))

    return jax.jit(run)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="1b")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--active", type=float, default=0.1)
    p.add_argument("--paths", default="dense,xla,portable")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--json", default=None)
    a = p.parse_args()
    names = a.paths.split(",")
    cfg = shape_config(a.shape)
    d, f, dt = cfg.hidden_size, cfg.intermediate_size, DTYPES[a.dtype]
    keys = jax.random.split(jax.random.key(0), 3 * a.layers)
    w = [(0.02 * jax.random.normal(k, (f, d), jnp.float32)).astype(dt) for k in keys]
    layers = [dict(gate=w[3 * i], up=w[3 * i + 1], down_t=w[3 * i + 2],
                   bits=pk.pack_sign_bits(w[3 * i])) for i in range(a.layers)]
    x0 = jnp.asarray(np.random.default_rng(0).standard_normal((a.batch, d)), dt)
    alpha = alpha_keeping(x0[:1], layers[0]["bits"], a.active)  # layer 0's, for x0's first row

    fns = {n: chained(PATHS[n]) for n in names}
    computed = {n: float(jax.block_until_ready(fns[n](x0, layers, alpha))[1]) / f for n in names}
    ms: dict[str, list[float]] = {n: [] for n in names}
    for r in range(a.repeats):
        for n in names[r % len(names):] + names[:r % len(names)]:
            ms[n].append(time_calls(fns[n], x0, layers, alpha, repeats=1)[0] / a.layers * 1e3)
    print(f"{jax.devices()[0]}, {a.shape} MLP (D={d}, F={f}, {a.dtype}, batch {a.batch}) x "
          f"{a.layers} layers, {a.repeats} paired repeats")
    rows = []
    for n in names:
        row = dict(path=n, computed=computed[n], ms_a_layer=statistics.median(ms[n]),
                   ms_all=ms[n])
        for other in names[:names.index(n)]:
            ratios = [t / u for t, u in zip(ms[n], ms[other], strict=True)]
            q = np.percentile(ratios, [25, 50, 75])
            row[f"over_{other}"] = dict(median=q[1], iqr=[q[0], q[2]])
        rows.append(row)
        pairs = "  ".join(f"{v['median']:.3f} of {k[5:]} ({v['iqr'][0]:.3f}-{v['iqr'][1]:.3f})"
                          for k, v in row.items() if k.startswith("over_"))
        print(f"{n:<9} {row['ms_a_layer']:8.3f} ms a layer, computed {computed[n]:.3f}  {pairs}",
              flush=True)
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(dict(args=vars(a), device=str(jax.devices()[0]), rows=rows), fh, indent=1)


if __name__ == "__main__":
    main()
