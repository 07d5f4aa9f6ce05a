"""Rotary position embeddings with HF Llama's rope types: default, linear, dynamic, llama3."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from sparseinfer_jax.model.config import LlamaConfig


def _base_inv_freq(theta: float | jnp.ndarray, head_dim: int) -> jnp.ndarray:
    exponents = np.arange(0, head_dim, 2, dtype=np.float32) / head_dim
    return 1.0 / (theta ** jnp.asarray(exponents))


def _llama3_inv_freq(cfg: LlamaConfig) -> np.ndarray:
    """Llama 3 scaling: long wavelengths divided by `factor`, short kept, a smooth ramp between."""
    rope = cfg.rope
    inv_freq = 1.0 / rope.theta ** (np.arange(0, cfg.head_dim, 2, dtype=np.float64) / cfg.head_dim)
    old_len = rope.original_max_position_embeddings
    low_wavelen = old_len / rope.low_freq_factor
    high_wavelen = old_len / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (old_len / wavelen - rope.low_freq_factor) / (
        rope.high_freq_factor - rope.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def inv_freq(cfg: LlamaConfig, seq_len: jnp.ndarray | None = None) -> jnp.ndarray:
    """Inverse frequencies `[head_dim // 2]` float32.

    Args:
      seq_len: for `dynamic` (NTK) scaling only, the current sequence length (max position + 1,
        a traced scalar is fine); like transformers, the base grows once it exceeds
        `max_position_embeddings`.
    """
    rope = cfg.rope
    if rope.rope_type == "linear":
        return _base_inv_freq(rope.theta, cfg.head_dim) / rope.factor
    if rope.rope_type == "llama3":
        return jnp.asarray(_llama3_inv_freq(cfg))
    if rope.rope_type == "dynamic" and seq_len is not None:
        max_len = cfg.max_position_embeddings
        seq_len = jnp.maximum(jnp.asarray(seq_len, jnp.float32), max_len)
        dim = cfg.head_dim
        base = rope.theta * ((rope.factor * seq_len / max_len) - (rope.factor - 1)) ** (
            dim / (dim - 2)
        )
        return _base_inv_freq(base, dim)
    return _base_inv_freq(rope.theta, cfg.head_dim)


def rope_tables(cfg: LlamaConfig, positions: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """cos and sin for `positions: [B, T]` int -> two `[B, T, head_dim]` float32 arrays."""
    if cfg.rope.rope_type == "dynamic":
        # Per row, so a row's result does not depend on what it is batched with.
        seq_len = jnp.max(positions, axis=1) + 1
        freqs_per_row = jax.vmap(lambda n: inv_freq(cfg, n))(seq_len)[:, None, :]
    else:
        freqs_per_row = inv_freq(cfg)
    freqs = positions[..., None].astype(jnp.float32) * freqs_per_row
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
    """Rotates `x: [B, T, heads, head_dim]` with the rotate-half layout of HF Llama."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos = cos[:, :, None, :].astype(x.dtype)
    sin = sin[:, :, None, :].astype(x.dtype)
    return x * cos + rotated * sin
