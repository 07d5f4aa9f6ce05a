"""Predicted vs true sparsity, recall and precision of the sign predictor over alpha.

Decodes greedily from prompts of the shipped model's validation text in `sparse` mode with
diagnostic statistics, for each alpha, and prints one row per alpha (means over layers) plus the
per-layer figures; --json writes them.

    python benchmarks/predictor_sweep.py --alphas 0.5,0.8,1,1.5,2,4 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np

import sparseinfer_jax as si
from sparseinfer_jax.loading import SHIPPED_MODEL


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=SHIPPED_MODEL)
    parser.add_argument("--alphas", default="0.5,0.8,1,1.5,2,4")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--backend", default="xla")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    model, tokenizer = si.load(args.model, dtype="float32", mode="sparse", backend=args.backend)
    with open(os.path.join(SHIPPED_MODEL, "validation.txt")) as f:
        lines = [line.strip() for line in f if len(line.strip()) > 40]
    step = max(1, len(lines) // args.prompts)
    prompts = [line[:60] for line in lines[::step][: args.prompts]]
    rows = []
    header = ("alpha", "pred_sparsity", "true_sparsity", "recall", "precision")
    print(" ".join(f"{h:>{w}}" for h, w in zip(header, (6, 13, 13, 7, 9), strict=True)))
    for alpha in [float(a) for a in args.alphas.split(",")]:
        r = si.generate(model, prompts, tokenizer=tokenizer, max_new_tokens=args.tokens,
                        stop_at_eos=False, alpha=alpha, stats="diagnostic")
        s = r.stats
        rows.append({"alpha": alpha,
                     **{k: np.asarray(getattr(s, k)).round(4).tolist() for k in
                        ("predicted_sparsity", "true_sparsity", "recall", "precision")}})
        print(f"{alpha:6.2f} {s.predicted_sparsity.mean():13.3f} {s.true_sparsity.mean():13.3f} "
              f"{s.recall.mean():7.3f} {s.precision.mean():9.3f}   per-layer recall "
              + " ".join(f"{v:.3f}" for v in s.recall))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
