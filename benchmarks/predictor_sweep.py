"""Which predictor reads fewer MLP bytes at equal perplexity: "sign" vs "signmag", per target.

For each predictor, calibrates the shipped model on its calibration text (each --target: a
perplexity budget in percent, or a recall) and evaluates sparse mode on the held-out validation
text: perplexity against dense, predicted and true sparsity, recall and MLP bytes read per token
over the dense MLP's (predictor included). Prints one row per (target, predictor); --json writes
the rows.

    python benchmarks/predictor_sweep.py --targets ppl:0.8,recall:0.99 --json out.json

--study instead compares the vote weightings themselves, per layer, on the MLP inputs of a dense
pass over the first --max-tokens tokens of the calibration text: for each rule, a neuron's margin
is its negative vote share n_neg / total (the ratio rule keeps it iff the margin is at most
alpha / (1 + alpha)); the threshold keeping --recall of the truly active (token, neuron) pairs
gives the predicted sparsity. Rules: "sign" (the paper's count), "planes:P" (signmag with P-bit
magnitudes, popcounts only) and "exact" (float |x| weights, the unquantised x . sign(W)).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

import pallas_kernels as pk
from sparseinfer_jax.api.loading import SHIPPED_MODEL, load
from sparseinfer_jax.io.text import read_text, token_windows
from sparseinfer_jax.model.rope import rope_tables
from sparseinfer_jax.tuning.calibration import calibrate_predictors
from sparseinfer_jax.tuning.evaluation import evaluate


def mlp_inputs(model, ids):
    """Per layer, the MLP inputs `[T, D]` and true active masks `[T, F]` of a dense pass."""
    t = ids.shape[1]
    mask = jnp.tril(jnp.ones((t, t), bool))[None]
    cos, sin = rope_tables(model.config, jnp.arange(t, dtype=jnp.int32)[None])
    x = model.embed_tokens(ids)
    out = []
    for layer in model.layers:
        attn, _ = layer.self_attn(layer.input_layernorm(x), cos, sin, mask, None, None)
        x = x + attn
        rows = layer.post_attention_layernorm(x)[0]
        h = layer.mlp.hidden(rows)
        out.append((rows, h != 0))
        x = x + layer.mlp.down(h)[None]
    return out


def margins(rule: str, x, bits, gate):
    """Negative vote share `[T, F]` of one rule (see the module docstring)."""
    if rule == "sign":
        _, n_neg = pk.sign_predict(x, bits, jnp.float32(1.0), backend="xla")
        total = jnp.sum(x != 0, axis=-1)
    elif rule == "exact":
        a = jnp.abs(x)
        n_neg = jnp.sum(a[:, None, :] * ((x[:, None, :] * gate[None]) < 0), axis=-1)
        total = jnp.sum(a, axis=-1)
    else:
        _, n_neg, total = pk.signmag_predict(x, bits, jnp.float32(1.0), backend="xla",
                                             planes=int(rule.split(":")[1]))
    return np.asarray(n_neg, np.float64) / np.maximum(np.asarray(total, np.float64), 1e-30)[:, None]


def study(model, tok, text: str, tokens: int, recall: float) -> None:
    windows = token_windows(tok.encode(text), max_tokens=tokens)
    rules = ["sign", "planes:1", "planes:2", "planes:3", "planes:4", "exact"]
    layers = model.config.num_hidden_layers
    per = {r: [[] for _ in range(layers)] for r in rules}
    truth = [[] for _ in range(layers)]
    for ids in windows:
        for li, (x, true) in enumerate(mlp_inputs(model, ids)):
            mlp = model.layers[li].mlp
            truth[li].append(np.asarray(true))
            for r in rules:
                per[r][li].append(margins(r, x, mlp.gate_sign_bits[...], mlp.gate[...]))
    print(f"predicted sparsity per layer at recall {recall} "
          f"({sum(w.shape[1] for w in windows)} tokens of the calibration text):")
    truth = [np.concatenate(t) for t in truth]
    print(f"{'true':<9} " + " ".join(f"{1 - t.mean():.3f}" for t in truth))
    for r in rules:
        row = []
        for li in range(layers):
            m, t = np.concatenate(per[r][li]), truth[li]
            cut = np.quantile(m[t], recall, method="higher")  # keeps >= recall of the active
            row.append(float((m > cut).mean()))
        print(f"{r:<9} " + " ".join(f"{v:.3f}" for v in row) + f"  mean {np.mean(row):.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=SHIPPED_MODEL)
    parser.add_argument("--targets", default="ppl:0.8,recall:0.99")
    parser.add_argument("--max-tokens", type=int, default=None, help="validation tokens")
    parser.add_argument("--backend", default="xla")
    parser.add_argument("--json", default=None)
    parser.add_argument("--study", action="store_true", help="compare the vote weightings")
    parser.add_argument("--recall", type=float, default=0.99, help="for --study")
    args = parser.parse_args()
    model, tok = load(args.model, dtype="float32", mesh=None)
    cal_text = read_text(os.path.join(args.model, "calibration.txt"))
    if args.study:
        with jax.default_matmul_precision("highest"):
            study(model, tok, cal_text, args.max_tokens or 4096, args.recall)
        return
    cal_windows = token_windows(tok.encode(cal_text))
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
