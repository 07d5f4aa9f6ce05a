"""Accelerator memory a model needs for `generate`, and which Colab GPUs that fits.

Counted from the config alone (no weights read), so a notebook can say before a 13 GB download
whether the model will fit. What lives on the device while generating:
- weights: every parameter of the checkpoint layout in `dtype` (embedding, untied LM head,
  attention, MLP `gate`/`up`/`down_t`, norms);
- sign bits: `gate_sign_bits`, `[L, F, ceil(D/32)]` uint32 (1 bit per W_gate weight, so 1/16 of
  `gate` in a 16-bit dtype);
- KV cache: keys and values `[L, B, S, K, hd]` in `dtype` for S slots. `generate` allocates
  `bucket(prompt) + bucket(max_new_tokens)` slots (powers of two), so S can be up to twice the
  tokens actually used; pass that S as `context`;
- prefill: the dense prefill's largest transient, one layer's attention scores `[B, H, P, S]`
  (float32) and probabilities (in `dtype`) plus its MLP pre-activations `[B, P, F]` (float32,
  gate and up);
- overhead: CUDA context, cuBLAS/XLA workspaces and the compiled program (`OVERHEAD_BYTES`, a
  rough constant).
Not counted: the host side (the tokenizer, the Python process) and JAX's preallocation: by default
JAX reserves 75% of the GPU at start-up, so set `XLA_PYTHON_CLIENT_MEM_FRACTION` (e.g. 0.95)
before importing jax when the estimate is close to the card's size.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from sparseinfer_jax.errors import UserError
from sparseinfer_jax.model import dtypes
from sparseinfer_jax.model.config import LlamaConfig

GiB = 2**30
OVERHEAD_BYTES = 1 * GiB
# Memory a Colab runtime's GPU reports (nvidia-smi, MiB) per card, largest last.
COLAB_GPUS = {
    "T4": 15360 * 2**20,
    "L4": 23034 * 2**20,
    "A100 40GB": 40960 * 2**20,
    "A100 80GB": 81920 * 2**20,
}
# T4 (compute capability 7.5) has no bfloat16 tensor cores: float16 is its 16-bit dtype.
NO_BF16 = ("T4",)


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    """Bytes on the accelerator for `generate` with one model, batch and context."""

    params: int
    weights_bytes: int
    sign_bits_bytes: int
    kv_bytes_per_token: int
    kv_cache_bytes: int
    prefill_bytes: int
    overhead_bytes: int

    @property
    def total_bytes(self) -> int:
        return (
            self.weights_bytes
            + self.sign_bits_bytes
            + self.kv_cache_bytes
            + self.prefill_bytes
            + self.overhead_bytes
        )


def parameter_count(config: LlamaConfig) -> int:
    """Number of weights (the sign bits not included)."""
    d, f = config.hidden_size, config.intermediate_size
    q_out = config.num_attention_heads * config.head_dim
    kv_out = config.num_key_value_heads * config.head_dim
    layer = d * q_out + 2 * d * kv_out + q_out * d + 3 * f * d + 2 * d
    embed = config.vocab_size * d
    head = 0 if config.tie_word_embeddings else embed
    return embed + head + config.num_hidden_layers * layer + d


def estimate_memory(
    config: LlamaConfig,
    *,
    batch: int = 1,
    context: int = 2048,
    prompt: int | None = None,
    dtype: str = "bfloat16",
    overhead_bytes: int = OVERHEAD_BYTES,
) -> MemoryEstimate:
    """Accelerator bytes to `generate` with `config` (see the module docstring).

    Args:
      batch: rows decoded together.
      context: KV-cache slots per row (prompt + new tokens, after bucketing).
      prompt: prompt tokens of the dense prefill; default: `context` (the worst case).
      dtype: weights' and KV cache's dtype: "bfloat16", "float16" or "float32".
    """
    if batch < 1 or context < 1:
        raise UserError(f"batch and context must be at least 1, got {batch} and {context}.")
    prompt = context if prompt is None else min(prompt, context)
    size = dtypes.itemsize(dtype)
    layers = config.num_hidden_layers
    params = parameter_count(config)
    kv_per_token = 2 * layers * config.num_key_value_heads * config.head_dim * size * batch
    scores = batch * config.num_attention_heads * prompt * context * (4 + size)
    mlp = batch * prompt * config.intermediate_size * 4 * 2
    return MemoryEstimate(
        params=params,
        weights_bytes=params * size,
        sign_bits_bytes=layers * config.intermediate_size * config.sign_words * 4,
        kv_bytes_per_token=kv_per_token,
        kv_cache_bytes=kv_per_token * context,
        prefill_bytes=scores + mlp,
        overhead_bytes=overhead_bytes,
    )


def fits(estimate: MemoryEstimate, gpu_bytes: int, memory_fraction: float = 0.95) -> bool:
    """Whether the estimate fits the share of a GPU JAX may use."""
    return estimate.total_bytes <= memory_fraction * gpu_bytes


def max_context(
    config: LlamaConfig,
    gpu_bytes: int,
    *,
    batch: int = 1,
    dtype: str = "bfloat16",
    memory_fraction: float = 0.95,
) -> int:
    """The largest power-of-two context (full-length prompt) that fits; 0 when none does."""
    best = 0
    for context in 2 ** np.arange(4, 21):
        est = estimate_memory(config, batch=batch, context=int(context), dtype=dtype)
        if not fits(est, gpu_bytes, memory_fraction):
            break
        best = int(context)
    return best


def format_estimate(est: MemoryEstimate, context: int) -> str:
    """A few lines: each term in GiB and the total."""
    count = f"{est.params / 1e9:.2f} B" if est.params >= 1e9 else f"{est.params / 1e6:.1f} M"
    rows = [
        (f"weights ({count} parameters)", est.weights_bytes),
        ("W_gate sign bits", est.sign_bits_bytes),
        (f"KV cache ({context} slots, {est.kv_bytes_per_token / 2**20:.3f} MiB/token)",
         est.kv_cache_bytes),
        ("prefill transients (attention scores, MLP)", est.prefill_bytes),
        ("CUDA/XLA overhead (rough)", est.overhead_bytes),
        ("total", est.total_bytes),
    ]
    return "\n".join(f"{name:<58} {b / GiB:8.3f} GiB" for name, b in rows)
