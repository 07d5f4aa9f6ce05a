"""Next-token selection: a repetition penalty, then greedy, temperature, top-k and top-p
(nucleus) sampling."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def sample(
    logits: jnp.ndarray,
    key: jax.Array,
    temperature: jnp.ndarray,
    top_p: jnp.ndarray,
    *,
    top_k: int | None,
) -> jnp.ndarray:
    """Picks one token per row.

    Args:
      logits: `[B, V]` float32.
      key: PRNG key for this step.
      temperature: scalar; 0 means greedy (argmax). Data, so changing it never recompiles.
      top_p: scalar in (0, 1]; keep the smallest set of tokens whose probability reaches it.
      top_k: keep the k most likely tokens (static: it sets an array size), None for all.
    Returns:
      `[B]` int32 token ids.
    """
    def greedy(logits: jnp.ndarray) -> jnp.ndarray:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def nucleus(logits: jnp.ndarray) -> jnp.ndarray:
        scaled = logits / jnp.maximum(temperature, 1e-6)
        neg = jnp.finfo(scaled.dtype).min
        if top_k is not None and top_k < logits.shape[-1]:
            kth = jax.lax.top_k(scaled, top_k)[0][:, -1:]
            scaled = jnp.where(scaled < kth, neg, scaled)
        sorted_logits = jnp.sort(scaled, axis=-1)[:, ::-1]
        cumulative = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
        # The cut-off logit is the first sorted one at which the mass reaches top_p (>= 1 token).
        cutoff_index = jnp.sum(cumulative < top_p, axis=-1, keepdims=True)
        cutoff_index = jnp.minimum(cutoff_index, logits.shape[-1] - 1)
        cutoff = jnp.take_along_axis(sorted_logits, cutoff_index, axis=-1)
        scaled = jnp.where(scaled < cutoff, neg, scaled)
        return jax.random.categorical(key, scaled, axis=-1).astype(jnp.int32)

    # Greedy decoding skips the vocabulary sort: on the CPU it cost 6 ms a token at V = 32000,
    # a tenth of a 1b x 8 layer decode step (benchmarks/RESULTS.md, 2026-11-29).
    return jax.lax.cond(temperature > 0, nucleus, greedy, logits)


def penalize_repeats(logits: jnp.ndarray, seen: jnp.ndarray, penalty: jnp.ndarray) -> jnp.ndarray:
    """Makes tokens already in the row less likely, as transformers' `repetition_penalty`.

    Args:
      logits: `[B, V]` float32.
      seen: `[B, V]` bool, the tokens of the row's prompt and output so far.
      penalty: scalar >= 1 (1 = off); a seen token's logit is divided by it when positive and
        multiplied by it when negative. Data, so changing it never recompiles.
    Returns:
      `[B, V]` float32.
    """
    penalized = jnp.where(logits > 0, logits / penalty, logits * penalty)
    return jnp.where(seen, penalized, logits)
