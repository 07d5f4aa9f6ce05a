"""Where each token sits: its RoPE position and the slots it attends to, built in one place for
the prefill, the decode step and every full forward (evaluation, calibration, `Llama.__call__`)."""

from __future__ import annotations

import jax.numpy as jnp


def position_limit(cfg) -> int | None:
    """Tokens a sequence may hold: `max_position_embeddings`, or None (no limit) with dynamic
    NTK RoPE scaling, which rescales RoPE for longer sequences (that is what it is for)."""
    return None if cfg.rope.rope_type == "dynamic" else cfg.max_position_embeddings


def causal_inputs(pad: jnp.ndarray, query_slots: jnp.ndarray,
                  num_slots: int) -> tuple[jnp.ndarray, jnp.ndarray]:
    """RoPE positions and the causal attention mask of rows left-padded by `pad` slots.

    Args:
      pad: `[B]` int32, the padding slots at the start of each row (0: none).
      query_slots: `[T]` int32, the slots of the tokens in this call.
      num_slots: S, the slots attended over (T without a cache).

    Returns:
      positions `[B, T]` int32 (a token's slot minus its row's padding) and mask `[B, T, S]` bool
      (a token sees the real slots up to its own).
    """
    slots = jnp.arange(num_slots)
    positions = jnp.maximum(query_slots[None, :] - pad[:, None], 0).astype(jnp.int32)
    mask = (slots[None, :] <= query_slots[:, None])[None] & (slots[None, :] >= pad[:, None])[
        :, None, :]
    return positions, mask


def full_causal_inputs(batch: int, length: int) -> tuple[jnp.ndarray, jnp.ndarray]:
    """`causal_inputs` of `batch` unpadded rows of `length` tokens, without a cache."""
    return causal_inputs(jnp.zeros((batch,), jnp.int32), jnp.arange(length), length)
