"""Decode latency per `model`-axis size, and per-shard active-neuron imbalance.

Two measurements, one JSON file:

1. latency: ms per decoded token of `generate` on a TinyLlama-1.1B-shaped model (D=2048, F=5632,
   32 heads, 4 KV heads, vocab 32000; depth cut to --layers, random ReLU weights, float32 by
   default: bfloat16 matmuls are slow on CPU), dense and
   sparse, on meshes data=1,model=m for each m of --devices. Forced CPU host devices share the
   machine's cores, so on a CPU this shows the cost of the collectives, not a speed-up.
2. imbalance: on the shipped model over a text, predicted-active neurons per token on each of m
   contiguous neuron shards (what each device of model=m computes per decoded token); reports
   mean over tokens of max/mean across shards (the slowest device sets the step time).

    XLA_FLAGS=--xla_force_host_platform_device_count=4 python benchmarks/sharding_bench.py
"""

from __future__ import annotations

import argparse
import json
import statistics

import jax
import jax.numpy as jnp
import numpy as np

from sparseinfer_jax import generate, load
from sparseinfer_jax.api.loading import SHIPPED_MODEL
from sparseinfer_jax.bench.shapes import random_model, shape_config
from sparseinfer_jax.model.llama import Llama
from sparseinfer_jax.model.sharding import make_mesh, shard_active_counts, shard_model


def random_1b(layers: int, mode: str, dtype: str) -> Llama:
    """The `bench` 1b shape cut to `layers`, random weights, alpha 1.0 (about half the neurons
    predicted active on random weights)."""
    model = random_model(shape_config("1b", layers), dtype)
    model.sparsity = model.with_sparsity(mode=mode, backend="xla")
    return model


def latency(
    layers: int, devices: list[int], new_tokens: int, repeats: int, dtype: str
) -> list[dict]:
    """Median ms per decoded token (batch 1, prompt of 8) per mode and model-axis size."""
    rows = []
    for mode in ("dense", "sparse"):
        model = random_1b(layers, mode, dtype)
        for m in devices:
            shard_model(model, make_mesh(1, m))
            runs = [
                generate(model, [list(range(3, 11))], max_new_tokens=new_tokens, stop_at_eos=False)
                for _ in range(repeats + 1)
            ]
            first = runs[0]
            ms = [r.timing.decode_s_per_token * 1e3 for r in runs[1:]]
            rows.append(
                dict(mode=mode, model_axis=m, ms_per_token=statistics.median(ms),
                     compile_s=first.timing.compile_s)
            )
            print(f"{mode:6s} model={m}: {rows[-1]['ms_per_token']:.1f} ms/token", flush=True)
    return rows


def imbalance(text_file: str, max_tokens: int, shards: list[int]) -> list[dict]:
    """Per-shard predicted-active neurons of the shipped model over the first tokens of a text."""
    model, tokenizer = load(SHIPPED_MODEL, mode="sparse")
    with open(text_file, encoding="utf-8") as f:
        ids = tokenizer.encode(f.read())[:max_tokens]
    rows = []
    for m in shards:
        counts = shard_active_counts(model, jnp.asarray([ids]), m).astype(np.float64)  # [L,T,m]
        ratio = counts.max(-1) / np.maximum(counts.mean(-1), 1e-9)  # [L, T]
        rows.append(
            dict(
                shards=m,
                tokens=len(ids),
                mean_active_per_shard=counts.mean(axis=(1, 2)).round(1).tolist(),
                max_over_mean_per_layer=ratio.mean(-1).round(3).tolist(),
                max_over_mean=float(ratio.mean()),
                worst_token_max_over_mean=float(ratio.max()),
                # Share of the layer's predicted-active neurons on each shard, over the text.
                share_per_layer=(counts.sum(1) / counts.sum((1, 2))[:, None]).round(3).tolist(),
            )
        )
        print(f"shards={m}: max/mean active per shard {rows[-1]['max_over_mean']:.3f} "
              f"(per layer {rows[-1]['max_over_mean_per_layer']})", flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--dtype", default="float32", help="float32 or bfloat16 (slow on CPU)")
    p.add_argument("--devices", default="1,2,4", help="model-axis sizes to time")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--text", default=f"{SHIPPED_MODEL}/validation.txt")
    p.add_argument("--max-tokens", type=int, default=1024)
    p.add_argument("--json", default="sharding_bench.json")
    args = p.parse_args()
    devices = [int(m) for m in args.devices.split(",")]
    result = dict(
        machine=f"{jax.device_count()} {jax.default_backend()} devices, jax {jax.__version__}",
        imbalance=imbalance(args.text, args.max_tokens, devices),
        latency=latency(args.layers, devices, args.new_tokens, args.repeats, args.dtype),
    )
    with open(args.json, "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
