"""What `generate` returns: the new tokens and text, timings, and per-layer statistics."""

from __future__ import annotations

import dataclasses

import numpy as np

from sparseinfer_jax.model.metrics import layer_metrics
from sparseinfer_jax.model.mlp import STAT_FIELDS


@dataclasses.dataclass(frozen=True)
class Timing:
    """Wall-clock seconds of one `generate` call (device-synchronised)."""

    compile_s: float
    prefill_s: float | None
    decode_s_per_token: float | None
    total_s: float
    new_tokens: int

    @property
    def tokens_per_s(self) -> float:
        """Decode throughput per row: new tokens per second after the prefill."""
        if self.decode_s_per_token:
            return 1.0 / self.decode_s_per_token
        return self.new_tokens / self.total_s if self.total_s else 0.0


@dataclasses.dataclass(frozen=True)
class LayerStats:
    """Per-layer decode statistics, arrays `[L]`, summed over rows and decode steps
    (`metrics.layer_metrics` defines each; true_sparsity, recall and precision need "diagnostic").

    computed_fraction: gate rows read per step over F (the union of the rows' candidates);
    fired_fraction: up and down rows read per step over F (the candidates that fired);
    mlp_bytes_fraction: MLP bytes read per step over the dense MLP's, predictor included
    (`metrics.bytes_fraction`).
    """

    predicted_sparsity: np.ndarray
    computed_fraction: np.ndarray
    fired_fraction: np.ndarray
    mlp_bytes_fraction: np.ndarray
    true_sparsity: np.ndarray | None = None
    recall: np.ndarray | None = None
    precision: np.ndarray | None = None

    @classmethod
    def from_sums(
        cls, sums: np.ndarray, steps: int, num_neurons: int, diagnostic: bool, share: float = 0.0
    ) -> LayerStats:
        """From the summed STAT_FIELDS `[L, 6]`; `share` is the predictor's bytes fraction."""
        s = dict(zip(STAT_FIELDS, np.asarray(sums, np.float64).T, strict=True))
        m = layer_metrics(s["rows"], s["predicted_active"], s["true_active"], s["both_active"],
                          neurons=num_neurons, share=share, computed=s["computed"],
                          fired=s["fired"], steps=steps)
        keep = [f.name for f in dataclasses.fields(cls)
                if diagnostic or f.name not in ("true_sparsity", "recall", "precision")]
        return cls(**{k: m[k] for k in keep})


@dataclasses.dataclass(frozen=True)
class GenerationResult:
    """What `generate` returns.

    tokens: `[B, N]` new token ids; after a row's EOS (kept) the rest is the pad id.
    lengths: `[B]` new tokens per row, its EOS included.
    agreed: `[B]` new tokens per row that are the model's own choice (all of them without
      `follow`).
    text: decoded new text per row when a tokenizer was given.
    """

    tokens: np.ndarray
    lengths: np.ndarray
    agreed: np.ndarray
    timing: Timing
    text: list[str] | None = None
    stats: LayerStats | None = None
