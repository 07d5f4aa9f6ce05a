"""Figures of an `eval` report (matplotlib, optional: `pip install matplotlib`)."""

from __future__ import annotations

import numpy as np

from sparseinfer_jax.errors import UserError


def plot_report(result: dict, path: str) -> None:
    """Writes a PNG: per-layer sparsity and recall, and perplexity vs MLP bytes read per token."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("--plot needs matplotlib; pip install matplotlib.") from None
    modes = result["modes"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    if "sparse" in modes:
        layers = modes["sparse"]["layers"]
        x = np.arange(len(layers))
        for i, (key, label) in enumerate([("true_sparsity", "true sparsity"),
                                          ("predicted_sparsity", "predicted sparsity"),
                                          ("recall", "recall")]):
            left.bar(x + (i - 1) * 0.27, [layer[key] for layer in layers], 0.27, label=label)
        left.set_xticks(x)
        left.set_xlabel("layer")
        left.set_ylim(0, 1.05)
        left.legend(loc="lower right")
        left.set_title("sparse mode, per layer")
    sweep = result.get("sweep", [])
    if sweep:
        right.plot([p["mlp_bytes_fraction"] for p in sweep], [p["perplexity"] for p in sweep],
                   "o-", label="sparse, alpha sweep")
        for p in sweep:
            right.annotate(f"x{p['scale']:g}", (p["mlp_bytes_fraction"], p["perplexity"]),
                           fontsize=7)
    right.axhline(modes["dense"]["perplexity"], color="gray", ls="--", label="dense")
    if "oracle" in modes:
        right.plot([modes["oracle"]["mlp_bytes_fraction"]], [modes["oracle"]["perplexity"]], "*",
                   ms=12, label="oracle")
    right.set_xlabel("MLP bytes read per token (of dense, predictor included)")
    right.set_ylabel("perplexity")
    right.legend()
    right.set_title("accuracy vs bytes read")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
