"""One decode layer's MLP on a GPU, beside the card's read roofline: dense against the sparse op,
each of its kernels, the chain it replaces, and the candidate launch shapes.

The roofline is a plain reduction over `--roofline-gib` of float32 (the rate reads alone reach).
Every MLP case runs over `--layers` different layers (the same input; each layer its own weights
and its own alpha for the wanted active fraction), so the rows a sparse layer reads come from
memory, not from the L2 where a repeated layer's rows would stay; `--calls` calls run inside one
jitted loop (`bench.timing.in_a_loop`), so a figure includes the launches but not Python's
dispatch. Prints one line per case: microseconds per layer, GB/s of the bytes the case must read
(the counts the op returns, so its bytes are exact), that over the roofline, and, for a whole MLP,
its time over the dense MLP's. Writes every figure to --json.

    python benchmarks/gpu_variants.py --json layer.json   # on a GPU: 7b layers (D 4096, F 11008)

Six 7b layers hold 1.6 GB of weights and, at 10 % active, about 100 MB of rows a sparse pass
reads: more than the 50-60 MB L2 of an H100 or H200, so a cyclic pass over them misses it.
    python benchmarks/gpu_variants.py --smoke             # CPU: tiny, interpret mode, every case
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics

import jax
import jax.numpy as jnp
import numpy as np

import pallas_kernels as pk
from pallas_kernels import backend as bk
from pallas_kernels.contract import activate, matmul, matmul_t
from pallas_kernels.gpu.chain import chain_mlp
from pallas_kernels.gpu.layer import layer_pallas
from pallas_kernels.gpu.masked_down import masked_down_pallas
from pallas_kernels.gpu.predict_gate_up import predict_gate_up_pallas
from sparseinfer_jax.bench.alphas import alpha_grid, fit_alphas
from sparseinfer_jax.bench.timing import time_in_a_loop

DTYPE, ITEM = jnp.bfloat16, 2
# Launch shapes tried beside the defaults: `layer_pallas` keyword arguments.
UP_CANDIDATES = (dict(up_tile=4096, up_num_warps=8), dict(up_num_warps=2), dict(up_slots=2),
                 dict(up_block_f=16), dict(up_block_f=16, up_slots=4), dict(up_block_f=4))
DOWN_CANDIDATES = (dict(down_block_r=256, down_slots=32, down_num_warps=4),
                   dict(down_block_r=64, down_slots=8), dict(down_block_d=256, down_num_warps=4),
                   dict(down_block_d=64), dict(down_slots=32, down_num_warps=4))


def alpha_for(x, bits, fraction: float, predictor: str) -> jnp.ndarray:
    """The alpha whose vote keeps about `fraction` of the neurons for `x: [1, D]`."""
    if predictor == "signmag":
        _, n_neg, n = pk.signmag_predict(x, bits, jnp.float32(1.0), backend="xla")
    else:
        _, n_neg = pk.sign_predict(x, bits, jnp.float32(1.0), backend="xla")
        n = jnp.sum(x != 0, axis=-1)
    n = int(n[0])
    kept = (np.asarray(n_neg)[0][None, :] <= np.arange(n + 1)[:, None]).mean(axis=1)
    return jnp.float32(fit_alphas(alpha_grid(n), kept[None], fraction)[0][0])


def roofline(nbytes: int, calls: int, repeats: int) -> float:
    """GB/s of a plain float32 sum over `nbytes`."""
    big = jnp.ones((nbytes // 4,), jnp.float32)
    seconds = statistics.median(time_in_a_loop(jnp.sum, (big,), calls=calls, repeats=repeats))
    del big
    return nbytes / seconds / 1e9


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d", type=int, default=4096)
    p.add_argument("--f", type=int, default=11008)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--calls", type=int, default=20)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--roofline-gib", type=float, default=4.0)
    p.add_argument("--smoke", action="store_true",
                   help="a tiny layer, 2 layers, one call: checks every case runs (CPU)")
    p.add_argument("--json")
    a = p.parse_args()
    if a.smoke:
        a.d, a.f, a.layers, a.calls, a.repeats, a.roofline_gib = 96, 200, 2, 1, 1, 1 / 64
    d, f = a.d, a.f
    interpret = bk.interpret()
    keys = jax.random.split(jax.random.key(0), 3 * a.layers + 1)
    x = jax.random.normal(keys[-1], (1, d), jnp.float32).astype(DTYPE)
    layers = []
    for i in range(a.layers):
        gate, up, down_t = ((jax.random.normal(k, (f, d), jnp.float32) / np.sqrt(d)).astype(DTYPE)
                            for k in keys[3 * i:3 * i + 3])
        layers.append(dict(gate=gate, up=up, down_t=down_t, bits=pk.pack_sign_bits(gate)))
    words = layers[0]["bits"].shape[1]
    alphas = {(pred, frac): jnp.stack([alpha_for(x, w["bits"], frac, pred) for w in layers])
              for pred in ("sign", "signmag") for frac in (0.1, 1.0)}
    roof = roofline(int(a.roofline_gib * (1 << 30)), max(1, a.calls // 4), a.repeats)
    print(f"{jax.devices()[0]} jax {jax.__version__}: D={d} F={f} bf16, batch 1, "
          f"{a.layers} layers a call, {a.calls} calls a loop; read roofline {roof:.0f} GB/s "
          f"(float32 sum over {a.roofline_gib:g} GiB)", flush=True)

    def over_layers(one):
        """fn(x, layers, alphas): `one(x, layer, alpha)` on every layer, outputs summed."""
        def run(x, layers, alphas):
            outs = [one(x, w, alphas[i]).astype(jnp.float32) for i, w in enumerate(layers)]
            return sum(outs).astype(x.dtype)
        return run

    def dense(x, w, alpha):
        h = activate(matmul_t(x, w["gate"]), "relu", 0.0) * matmul_t(x, w["up"])
        return matmul(h.astype(x.dtype), w["down_t"])

    def gate_matvec(x, w, alpha):
        return matmul_t(x, w["gate"])

    def op(x, w, alpha, predictor="sign", **blocks):
        return layer_pallas(x, w["gate"], w["up"], w["down_t"], w["bits"], alpha,
                            predictor=predictor, activation="relu", threshold=0.0,
                            interpret=interpret, **blocks)[0]

    def old_chain(x, w, alpha):
        active, _ = pk.sign_predict(x, w["bits"], alpha, backend="pallas")
        idx, count = pk.compact(active)
        return chain_mlp(x, w["gate"], w["up"], w["down_t"], idx, count, interpret=interpret)[0]

    def fused(x, w, alpha, vote="sign"):
        return predict_gate_up_pallas(x, w["gate"], w["up"], alpha=alpha, bits=w["bits"],
                                      vote=vote, interpret=interpret)[0]

    @functools.cache
    def counts(predictor: str, frac: float) -> tuple[int, int, int]:
        """(predicted, computed, fired) summed over the layers: the reference op's counts."""
        al = alphas[predictor, frac]
        return tuple(int(c) for c in sum(
            np.asarray(pk.sparse_mlp_layer(x, w["gate"], w["up"], w["down_t"], w["bits"], al[i],
                                           predictor=predictor, backend="reference")[1])
            for i, w in enumerate(layers)))

    def down(x, w, alpha, accumulate="partials"):
        """masked_down alone, on h from predict_gate_up at 10 % (`w["h"]`)."""
        acc = jnp.zeros((1, d), jnp.float32) if accumulate == "atomic" else None
        return masked_down_pallas(w["h"], w["down_t"], acc, accumulate=accumulate,
                                  interpret=interpret)

    for i, w in enumerate(layers):
        w["h"] = fused(x, w, alphas["sign", 0.1][i])

    n = a.layers
    bits_bytes = f * words * 4
    mlp_bytes = lambda pred, frac: bits_bytes + (  # noqa: E731
        counts(pred, frac)[1] + 2 * counts(pred, frac)[2]) * d * ITEM / n
    cases = [  # (name, one-layer fn, alpha key, bytes per layer (a function), kind)
        ("dense gate matvec", gate_matvec, ("sign", 1.0), lambda: f * d * ITEM, "kernel"),
        ("dense mlp", dense, ("sign", 1.0), lambda: 3 * f * d * ITEM, "dense"),
    ]
    for frac in (0.1, 1.0):
        cases.append((f"sparse op sign {frac:.0%}", op, ("sign", frac),
                      functools.partial(mlp_bytes, "sign", frac), "mlp"))
    cases += [
        ("sparse op signmag 10%", functools.partial(op, predictor="signmag"), ("signmag", 0.1),
         functools.partial(mlp_bytes, "signmag", 0.1), "mlp"),
        ("sparse op sign 10% atomic down", functools.partial(op, accumulate="atomic"),
         ("sign", 0.1), functools.partial(mlp_bytes, "sign", 0.1), "mlp"),
        ("old chain: predict+compact+sparse_mlp 10%", old_chain, ("sign", 0.1),
         functools.partial(mlp_bytes, "sign", 0.1), "mlp"),
    ]
    for pred in ("sign", "signmag"):
        cases.append((f"kernel predict_gate_up {pred} 10%", functools.partial(fused, vote=pred),
                      (pred, 0.1), lambda pred=pred: bits_bytes + sum(counts(pred, 0.1)[1:]) * d
                      * ITEM / n, "kernel"))
    for accumulate in ("partials", "atomic"):
        cases.append((f"kernel masked_down {accumulate} 10%",
                      functools.partial(down, accumulate=accumulate), ("sign", 0.1),
                      lambda: counts("sign", 0.1)[2] * d * ITEM / n, "kernel"))
    for blocks in (*UP_CANDIDATES, *DOWN_CANDIDATES):
        label = " ".join(f"{k}={v}" for k, v in blocks.items())
        cases.append((f"sparse op sign 10% {label}", functools.partial(op, **blocks),
                      ("sign", 0.1), functools.partial(mlp_bytes, "sign", 0.1), "mlp"))

    records, dense_us = [], None
    for name, one, alpha_key, size, kind in cases:
        try:
            size = size()
            us = statistics.median(time_in_a_loop(over_layers(one), (x, layers, alphas[alpha_key]),
                                                  calls=a.calls, repeats=a.repeats)) * 1e6 / n
            gb_s = size / (us * 1e-6) / 1e9
            rec = dict(name=name, kind=kind, us=us, bytes=size, gb_s=gb_s,
                       of_roofline=gb_s / roof)
            if kind == "dense":
                dense_us = us
            if kind in ("dense", "mlp") and dense_us:
                rec["of_dense"] = us / dense_us
            print(f"{name:<58} {us:9.2f} us {gb_s:8.1f} GB/s {gb_s / roof:5.2f} of roofline"
                  + (f"  {rec['of_dense']:.3f} of dense" if "of_dense" in rec else ""),
                  flush=True)
        except Exception as e:  # noqa: BLE001 - a variant that fails is a finding
            rec = dict(name=name, kind=kind, error=f"{type(e).__name__}: {str(e)[:300]}")
            print(f"{name:<58} FAILED {rec['error']}", flush=True)
        records.append(rec)
        if a.json:
            with open(a.json, "w") as out:
                json.dump(dict(device=str(jax.devices()[0]), jax=jax.__version__, d=d, f=f,
                               batch=1, layers=n, calls=a.calls, roofline_gb_s=roof,
                               roofline_bytes=int(a.roofline_gib * (1 << 30)), records=records),
                          out, indent=1)


if __name__ == "__main__":
    main()
