"""Which predictor reads fewer MLP bytes at equal perplexity: "sign" vs "signmag", per target.

For each predictor, calibrates the shipped model on its calibration text (each --target: a
perplexity budget in percent, or a recall) and evaluates sparse mode on the held-out validation
text: perplexity against dense, predicted and true sparsity, recall and MLP bytes read per token
over the dense MLP's (predictor included). Prints one row per (target, predictor); --json writes
the rows.

    python benchmarks/predictor_sweep.py --targets ppl:0.8,recall:0.99 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

from sparseinfer_jax.calibration import calibrate_predictors, read_text, token_windows
from sparseinfer_jax.evaluation import evaluate
from sparseinfer_jax.loading import SHIPPED_MODEL, load


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=SHIPPED_MODEL)
    parser.add_argument("--targets", default="ppl:0.8,recall:0.99")
    parser.add_argument("--max-tokens", type=int, default=None, help="validation tokens")
    parser.add_argument("--backend", default="xla")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    model, tok = load(args.model, dtype="float32", mesh=None)
    cal_windows = token_windows(tok.encode(read_text(os.path.join(args.model, "calibration.txt"))))
    val_windows = token_windows(tok.encode(read_text(os.path.join(args.model, "validation.txt"))),
                                max_tokens=args.max_tokens)
    rows = []
    print(f"{'target':<12} {'predictor':<9} {'ppl':>8} {'dense':>8} {'rise %':>7} "
          f"{'pred.sp':>7} {'true.sp':>7} {'recall':>6} {'bytes':>6}  alphas")
    for target in args.targets.split(","):
        kind, value = target.split(":")
        key = {"ppl": "max_ppl_increase", "recall": "target_recall"}[kind]
        for predictor in ("sign", "signmag"):
            start = time.perf_counter()
            cal = calibrate_predictors(model, cal_windows, (predictor,),
                                       backend=args.backend, **{key: float(value)})[0]
            seconds = time.perf_counter() - start
            r = evaluate(model, val_windows, modes=("dense", "sparse"), backend=args.backend)
            dense, sparse = r["modes"]["dense"], r["modes"]["sparse"]
            row = dict(target=target, predictor=predictor, alphas=cal.alphas,
                       calibration_s=seconds, dense_perplexity=dense["perplexity"],
                       calibration_bytes=cal.mlp_bytes_fraction, **{
                           k: sparse[k] for k in ("perplexity", "predicted_sparsity",
                                                  "true_sparsity", "recall", "top1_agreement",
                                                  "mlp_bytes_fraction", "layers")})
            rows.append(row)
            rise = 100 * (row["perplexity"] / row["dense_perplexity"] - 1)
            print(f"{target:<12} {predictor:<9} {row['perplexity']:>8.4f} "
                  f"{row['dense_perplexity']:>8.4f} {rise:>7.3f} {row['predicted_sparsity']:>7.3f} "
                  f"{row['true_sparsity']:>7.3f} {row['recall']:>6.3f} "
                  f"{row['mlp_bytes_fraction']:>6.3f}  {np.round(cal.alphas, 2).tolist()}")
            print("    per layer: predicted sparsity "
                  + " ".join(f"{x['predicted_sparsity']:.3f}" for x in row["layers"])
                  + ", bytes " + " ".join(f"{x['mlp_bytes_fraction']:.3f}" for x in row["layers"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
            f.write("\n")


if __name__ == "__main__":
    main()
