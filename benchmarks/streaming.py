"""What streaming costs: decode tokens/s with the loop in one call vs in calls of K steps.

For each model (the shipped tiny ReLU-Llama; a random-weight shape from `sparseinfer bench`, cut
to a few layers) and mode, times `generate` without streaming and with `stream=` at several
chunk sizes and at the default ("auto": chunks sized to `STREAM_INTERVAL_S`), interleaved repeat
by repeat so a busy machine slows every setting alike. The shipped model streams into a
`TextStream` (detokenising as the CLI does); the random one, which has no tokenizer, into a list.
Prints medians of the decode time per token and the ratio to the one-call decode, and process CPU
time per token (steadier on a shared machine); `--json` writes every figure.

    python benchmarks/streaming.py --tokens 128 --repeats 7 --chunks 1,4,8,16,auto --json s.json
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import time

import numpy as np

from sparseinfer_jax import generate, load
from sparseinfer_jax.bench.shapes import random_model, shape_config
from sparseinfer_jax.runtime.streaming import TextStream


def _sink(tokenizer):
    if tokenizer is None:
        return [].append
    return TextStream(tokenizer, io.StringIO())


def measure(model, tokenizer, prompt, mode: str, chunks: list[str], tokens: int,
            repeats: int) -> list[dict]:
    """Median decode ms/token (and process CPU ms/token) per setting (a chunk size, "auto" or
    "one-call": no streaming)."""
    kw = dict(max_new_tokens=tokens, mode=mode, backend="xla", stop_at_eos=False)
    settings = ["one-call", *chunks]
    wall = {c: [] for c in settings}
    cpu = {c: [] for c in settings}

    def extra(c: str) -> dict:
        if c == "one-call":
            return {}
        return {"stream": _sink(tokenizer), "stream_chunk": None if c == "auto" else int(c)}

    for c in settings:  # warm-up: compiles (the same two programs for every chunk size)
        generate(model, prompt, **kw, **extra(c))
    for _ in range(repeats):
        for c in settings:
            start = time.process_time()
            t = generate(model, prompt, **kw, **extra(c)).timing
            cpu[c].append((time.process_time() - start) / tokens)
            wall[c].append(t.decode_s_per_token)
    base = statistics.median(wall["one-call"])
    return [dict(mode=mode, chunk=c, decode_ms=statistics.median(wall[c]) * 1e3,
                 cpu_ms_per_token=statistics.median(cpu[c]) * 1e3,
                 vs_one_call=statistics.median(wall[c]) / base) for c in settings]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--chunks", default="1,4,8,16,auto")
    parser.add_argument("--shape", default="1b", help="random-weight shape (0 layers: skip)")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    chunks = [c.strip() for c in args.chunks.split(",")]
    records = []
    shipped, tokenizer = load()
    models = [("shipped tiny (bf16)", shipped, tokenizer, tokenizer.encode("Return the"))]
    if args.layers:
        cfg = shape_config(args.shape, args.layers)
        models.append((f"{args.shape} x {args.layers} layers (f32, random)",
                       random_model(cfg, "float32"), None, np.arange(3, 11)[None]))
    for name, model, tok, prompt in models:
        prompt = [list(map(int, np.ravel(prompt)))]
        for mode in ("dense", "sparse"):
            for r in measure(model, tok, prompt, mode, chunks, args.tokens, args.repeats):
                r["model"] = name
                records.append(r)
                chunk = r["chunk"] if not r["chunk"].isdigit() else f"chunks of {r['chunk']}"
                print(f"{name:34s} {mode:6s} {chunk:13s} {r['decode_ms']:7.3f} ms/token "
                      f"({1e3 / r['decode_ms']:6.0f} tokens/s, x{r['vs_one_call']:.2f}), "
                      f"cpu {r['cpu_ms_per_token']:.3f} ms/token", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=1)
            f.write("\n")


if __name__ == "__main__":
    main()
