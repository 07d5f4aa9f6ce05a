"""Perplexity and predictor quality per MLP mode over non-overlapping windows of a text.

Each window (`WINDOW` tokens; the last may be shorter) runs as one full forward without a cache, so
in "sparse" and "oracle" mode every token gets its own mask (see `mlp.py`). Perplexity is
exp(mean NLL) over every position that has a next token inside its window.

Per mode other than dense (summed over all tokens of the text, per layer, from the model's
"diagnostic" statistics, i.e. on that mode's own hidden states; `metrics.layer_metrics` defines
each):
- true_sparsity, predicted_sparsity (the neurons a token's MLP skips), recall, precision (overall:
  over the counts of every layer together);
- top1_agreement: share of positions whose argmax next token equals dense mode's.
- mlp_bytes_fraction (overall = mean over layers, and per layer): MLP weight bytes read per token
  over the dense MLP's (gate + up + down), as the two-stage kernel reads them for that token alone
  (`metrics.bytes_fraction`): the packed sign bits of gate (1 bit per weight, 1/48 of the MLP in
  bfloat16), the gate rows of the predicted-active neurons, and the up and down rows of those whose
  gate fires (predicted and truly active). Oracle reports what a free, perfect predictor would
  leave: the truly active rows of all three. Per token: a batch reads the union of its tokens'
  rows, which is more.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from sparseinfer_jax.errors import UserError
from sparseinfer_jax.io.text import check_windows
from sparseinfer_jax.model.metrics import layer_metrics, mlp_weights, predictor_share
from sparseinfer_jax.model.mlp import MODES, STAT_FIELDS
from sparseinfer_jax.model.positions import full_causal_inputs


@nnx.jit(static_argnames=["mode", "backend", "diagnostic"])
def window_logits(model, input_ids, *, mode: str, backend: str, diagnostic: bool = True):
    """Full forward of `input_ids: [1, T]`: logits `[1, T, V]` and diagnostic stats `[L, 6]`
    (None in dense mode or without `diagnostic`)."""
    b, t = input_ids.shape
    positions, mask = full_causal_inputs(b, t)
    stats = "diagnostic" if diagnostic and mode != "dense" else None
    x, _, layer_stats = model.forward(
        input_ids, positions, mask, sparsity=model.with_sparsity(mode=mode, backend=backend),
        stats=stats,
    )
    out = model.logits(x), layer_stats
    if model.mesh is not None:  # replicated, so that every process of a multi-host job can read it
        out = jax.lax.with_sharding_constraint(out, NamedSharding(model.mesh, P()))
    return out


def nll_sum(logits: np.ndarray, ids: np.ndarray) -> tuple[float, int]:
    """Summed next-token NLL of `ids: [T]` under `logits: [T, V]` (float64), and the count."""
    z = logits[:-1].astype(np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
    return float(-logp[np.arange(len(ids) - 1), ids[1:]].sum()), len(ids) - 1


def perplexity(model, windows, *, mode: str = "dense", backend: str = "auto") -> float:
    """exp(mean next-token NLL) of one mode over `windows` (`[1, T]` int32 arrays)."""
    windows = list(windows)
    check_windows(model.config, windows)
    nll, count = 0.0, 0
    for ids in windows:
        logits, _ = window_logits(model, ids, mode=mode, backend=backend, diagnostic=False)
        n, c = nll_sum(np.asarray(jax.device_get(logits[0])), np.asarray(ids[0]))
        nll, count = nll + n, count + c
    return float(np.exp(nll / count))


def check_modes(modes, flag: str = "modes") -> None:
    """Raises UserError unless `modes` names one or more of MODES; `flag` names the option."""
    modes = list(modes)
    if not modes or any(m not in MODES for m in modes):
        raise UserError(f"{flag} must name one or more of {', '.join(MODES)} (comma-separated), "
                        f"got '{','.join(map(str, modes))}'.")


def _mode_entry(mode: str, nll: float, count: int, agree: int, positions: int,
                stats: np.ndarray, neurons: int, share: float) -> dict:
    """One mode's result: perplexity, and outside dense mode top-1 agreement and the per-layer
    metrics (`metrics.layer_metrics`) from its summed STAT_FIELDS `stats: [L, 6]`."""
    entry = {"perplexity": float(np.exp(nll / count)), "nll": nll / count}
    if mode == "dense":
        return entry
    rows, pred, true, both = (stats[:, i] for i in range(4))
    if mode == "oracle":  # a free, perfect predictor: it predicts exactly the true mask
        pred, both, share = true, true, 0.0
    per_layer = layer_metrics(rows, pred, true, both, neurons=neurons, share=share)
    keys = ("true_sparsity", "predicted_sparsity", "recall", "precision", "mlp_bytes_fraction")
    layers = [{k: float(per_layer[k][li]) for k in keys} for li in range(len(rows))]
    overall = layer_metrics(rows.sum(), pred.sum(), true.sum(), both.sum(), neurons=neurons)
    entry.update(
        top1_agreement=agree / positions,
        true_sparsity=float(np.mean(per_layer["true_sparsity"])),
        predicted_sparsity=float(np.mean(per_layer["predicted_sparsity"])),
        recall=float(overall["recall"]),
        precision=float(overall["precision"]),
        mlp_bytes_fraction=float(np.mean(per_layer["mlp_bytes_fraction"])),
        layers=layers,
    )
    return entry


def evaluate(
    model, windows, *, modes=("dense", "sparse"), backend: str = "auto", progress: bool = False
) -> dict:
    """Runs every mode over `windows` (`[1, T]` int32 arrays) -> the JSON-ready result dict."""
    check_modes(modes)
    windows = list(windows)
    check_windows(model.config, windows)
    cfg = model.config
    run_modes = list(dict.fromkeys(["dense", *modes]))  # dense too: top-1 agreement needs it
    stat_shape = (cfg.num_hidden_layers, len(STAT_FIELDS))
    acc = {m: dict(nll=0.0, count=0, agree=0, positions=0, stats=np.zeros(stat_shape))
           for m in run_modes}
    tokens = int(sum(w.shape[1] for w in windows))
    if progress:
        from tqdm import tqdm

        windows = tqdm(windows, desc="eval", unit="window")
    for ids in windows:
        ids_np = np.asarray(ids[0])
        dense_top1 = None
        for m in run_modes:
            logits, stats = window_logits(model, ids, mode=m, backend=backend)
            logits = np.asarray(jax.device_get(logits[0]))
            nll, count = nll_sum(logits, ids_np)
            top1 = logits.argmax(axis=-1)
            dense_top1 = top1 if m == "dense" else dense_top1
            a = acc[m]
            a["nll"], a["count"] = a["nll"] + nll, a["count"] + count
            a["agree"] += int((top1 == dense_top1).sum())
            a["positions"] += len(top1)
            if stats is not None:
                a["stats"] += np.asarray(jax.device_get(stats), np.float64)
    share = predictor_share(cfg, *mlp_weights(model))
    return {"tokens": tokens, "modes": {
        m: _mode_entry(m, **acc[m], neurons=cfg.intermediate_size, share=share) for m in modes}}


def format_report(result: dict) -> str:
    lines = []
    for m, e in result["modes"].items():
        line = f"[{m}] perplexity {e['perplexity']:.4f}"
        if m != "dense":
            line += (
                f", top-1 agreement {e['top1_agreement']:.4f}, predicted sparsity "
                f"{e['predicted_sparsity']:.4f} (true {e['true_sparsity']:.4f}), recall "
                f"{e['recall']:.4f}, precision {e['precision']:.4f}, MLP bytes read "
                f"{e['mlp_bytes_fraction']:.4f} of dense"
            )
        lines.append(line)
        if m != "dense":
            for i, layer in enumerate(e["layers"]):
                lines.append(
                    f"  layer {i}: true sparsity {layer['true_sparsity']:.4f}, predicted "
                    f"{layer['predicted_sparsity']:.4f}, recall {layer['recall']:.4f}, "
                    f"precision {layer['precision']:.4f}, "
                    f"MLP bytes {layer['mlp_bytes_fraction']:.4f}"
                )
    return "\n".join(lines)


def alpha_sweep(model, windows, scales, *, backend: str = "auto") -> list[dict]:
    """Sparse-mode perplexity, predicted sparsity, recall and MLP bytes read with the model's
    alphas times each scale.

    Alpha is data, so every point reuses one compiled forward. The model's alphas are restored.
    """
    base = model.alphas()
    points = []
    try:
        for scale in scales:
            model.set_alphas(base * jnp.float32(scale))
            sparse = evaluate(model, windows, modes=("sparse",), backend=backend)["modes"]["sparse"]
            points.append({"scale": float(scale), "alpha": np.asarray(
                model.alphas()).round(4).tolist(), **{
                k: sparse[k] for k in ("perplexity", "predicted_sparsity", "recall",
                                       "mlp_bytes_fraction")}})
    finally:
        model.set_alphas(base)
    return points
