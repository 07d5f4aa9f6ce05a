"""A `generate` request checked before any work: prompts encoded, sampling values, new tokens,
the position limit, the KV cache's size; and the length buckets programs are compiled for.

Each check raises `UserError` in one sentence; the CLI calls the same checks before loading a
model.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sparseinfer_jax.errors import UserError
from sparseinfer_jax.io.text import position_limit
from sparseinfer_jax.model.config import LlamaConfig
from sparseinfer_jax.model.dtypes import DTYPES
from sparseinfer_jax.model.llama import Llama
from sparseinfer_jax.model.memory import estimate_memory

MIN_BUCKET = 16
STATS = (None, "predicted", "diagnostic")


def bucket(n: int) -> int:
    """Smallest power of two >= n, at least MIN_BUCKET."""
    return max(MIN_BUCKET, 1 << max(0, n - 1).bit_length())


def check_text(text: str, what: str) -> None:
    """Raises UserError when `text` cannot be UTF-8 (bytes that were not UTF-8 on the command
    line arrive as lone surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise UserError(
            f"{what} is not valid UTF-8 text (bad byte at character {e.start}); pass UTF-8 text."
        ) from None


def memory_limit() -> int | None:
    """Bytes of the first device (its reported limit), or of the host's RAM on the CPU."""
    stats = jax.local_devices()[0].memory_stats() or {}
    if stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return None


def _check_length(model, ids: list[list[int]], max_new_tokens: int) -> None:
    """Prompt + new tokens within the model's positions, and a KV cache that can exist at all."""

    cfg = model.config
    longest, limit = max(len(row) for row in ids), position_limit(cfg)
    if limit is not None and longest + max_new_tokens > limit:
        raise UserError(
            f"the longest prompt ({longest} tokens) plus max_new_tokens ({max_new_tokens}) "
            f"exceeds the model's {limit} positions (max_position_embeddings); shorten the "
            "prompt or ask for fewer new tokens."
        )
    slots = bucket(longest) + bucket(max_new_tokens)
    name = jnp.dtype(model.dtype).name
    est = estimate_memory(cfg, batch=len(ids), context=slots, prompt=bucket(longest),
                          dtype=name if name in DTYPES else "float32")
    need, have = est.kv_cache_bytes + est.prefill_bytes, memory_limit()
    shards = 1 if model.mesh is None else model.mesh.size
    if have and need / shards > have:
        raise UserError(
            f"{len(ids)} prompt(s) of up to {longest} tokens with max_new_tokens "
            f"{max_new_tokens} need a {need / 2**30:.1f} GiB KV cache, more than the "
            f"{have / 2**30:.1f} GiB of memory here; ask for fewer new tokens or fewer prompts."
        )


def encode_prompts(prompts, tokenizer) -> list[list[int]]:
    if isinstance(prompts, str):
        prompts = [prompts]
    if isinstance(prompts, np.ndarray | jax.Array):
        prompts = np.asarray(prompts)
        if not np.issubdtype(prompts.dtype, np.integer):
            raise UserError(f"token ids must be integers, got an array of {prompts.dtype}.")
        if prompts.ndim == 1:
            prompts = prompts[None]
        return [list(map(int, row)) for row in prompts]
    prompts = list(prompts)
    if not prompts:
        raise UserError("generate got no prompts; pass a string, a list of strings or token ids.")
    if all(isinstance(p, str) for p in prompts):
        if tokenizer is None:
            raise UserError(
                "generate got text prompts but no tokenizer; pass tokenizer=... or ids."
            )
        for p in prompts:
            check_text(p, "a prompt")
        return [tokenizer.encode(p) for p in prompts]
    if all(
        isinstance(p, Sequence) and all(isinstance(t, int | np.integer) for t in p) for p in prompts
    ):
        return [list(map(int, p)) for p in prompts]
    raise UserError("prompts must be a string, a list of strings, or a list of token id lists.")


def _whole(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_argument_types(model, tokenizer, stream, **values) -> None:
    """Raises UserError for arguments of `generate` of the wrong kind, before any of them is
    used: the model not a loaded one, counts that are not whole numbers, sampling values that are
    not numbers, a stream that cannot be called, a tokenizer without encode/decode."""
    if not isinstance(model, Llama):
        raise UserError(f"generate takes a model from sparseinfer_jax.load, got "
                        f"{type(model).__name__}; load it first: model, tokenizer = load(path).")
    for name, value in values.items():
        whole = name in ("max_new_tokens", "top_k", "stream_chunk")
        if value is None and name in ("top_k", "top_p", "stream_chunk"):
            continue
        if not (_whole(value) if whole else _number(value)):
            kind = "a whole number" if whole else "a number"
            raise UserError(f"{name} must be {kind}, got {value!r}.")
    if stream is not None and not callable(stream):
        raise UserError(f"stream must be a function of the new tokens, got {stream!r}.")
    if tokenizer is not None and not all(hasattr(tokenizer, a) for a in ("encode", "decode")):
        raise UserError(f"tokenizer must be the one load returns (with encode and decode), got "
                        f"{type(tokenizer).__name__}.")


def check_sampling(temperature: float, top_p: float | None, top_k: int | None,
                   repetition_penalty: float = 1.0) -> None:
    """Raises UserError for sampling values that would silently mean something else (a NaN
    temperature compares false with everything, so it acted as greedy)."""
    if not (math.isfinite(temperature) and temperature >= 0):
        raise UserError(
            f"temperature must be a finite number >= 0 (0 = greedy), got {temperature}."
        )
    if top_p is not None and not 0 < top_p <= 1:
        raise UserError(f"top_p must be in (0, 1], got {top_p}.")
    if top_k is not None and top_k < 1:
        raise UserError(f"top_k must be at least 1, got {top_k}.")
    if not (math.isfinite(repetition_penalty) and repetition_penalty >= 1):
        raise UserError(
            f"repetition_penalty must be a finite number >= 1 (1 = off), got {repetition_penalty}."
        )


def check_seed(seed) -> None:
    """Raises UserError unless `seed` is a whole number that fits a PRNG key (int64)."""
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or not (
        -(2**63) <= int(seed) < 2**63
    ):
        raise UserError(f"seed must be a whole number in [-2**63, 2**63), got {seed!r}.")


def check_new_tokens(max_new_tokens: int, cfg: LlamaConfig | None = None, *,
                     flag: str = "max_new_tokens") -> None:
    """Raises UserError for fewer than 1 new token or, given the model's `cfg`, as many as its
    positions (no room left for a prompt); checkable before the model loads. `flag` names the
    option in the message."""
    if max_new_tokens < 1:
        raise UserError(f"{flag} must be at least 1, got {max_new_tokens}.")
    limit = None if cfg is None else position_limit(cfg)
    if limit is not None and max_new_tokens >= limit:
        raise UserError(
            f"{flag} {max_new_tokens} leaves no room for a prompt within the model's {limit} "
            "positions (max_position_embeddings); ask for fewer."
        )


def check_request(
    model,
    ids: list[list[int]],
    max_new_tokens: int,
    stats: str | None,
    stream_chunk: int | None = None,
) -> None:
    """Raises UserError for empty prompts, ids outside the vocabulary, a bad new-token count or
    stats value, prompts too long for the positions, a KV cache that cannot fit, or a stream
    chunk under 1 (the mode and backend: `Llama.with_sparsity`)."""
    if any(len(row) == 0 for row in ids):
        raise UserError("a prompt is empty after tokenisation; give at least one token per prompt.")
    vocab = model.config.vocab_size
    if any(not 0 <= t < vocab for row in ids for t in row):
        raise UserError(f"a prompt token id is outside the vocabulary [0, {vocab}).")
    check_new_tokens(max_new_tokens)
    if stats not in STATS:
        raise UserError(f"stats must be one of {STATS}, got {stats!r}.")
    _check_length(model, ids, max_new_tokens)
    if stream_chunk is not None and stream_chunk < 1:
        raise UserError(f"stream_chunk must be at least 1, got {stream_chunk}.")


def follow_array(follow, rows: int, slots: int, max_new_tokens: int, vocab: int) -> np.ndarray:
    """`follow` as `[rows, slots]` int32, -1 where the model chooses."""
    out = np.full((rows, slots), -1, np.int32)
    if follow is None:
        return out
    follow = [list(map(int, row)) for row in follow]
    if len(follow) != rows or any(len(row) > max_new_tokens for row in follow):
        raise UserError(
            f"follow must give at most max_new_tokens ({max_new_tokens}) ids for each of the "
            f"{rows} prompts."
        )
    if any(not 0 <= t < vocab for row in follow for t in row):
        raise UserError(f"a follow token id is outside the vocabulary [0, {vocab}).")
    for i, row in enumerate(follow):
        out[i, : len(row)] = row
    return out
