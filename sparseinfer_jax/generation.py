"""Text generation: prefill and the whole decode loop in one compiled program.

The program takes left-padded prompts `[B, P]` and runs a dense prefill that fills a statically
shaped KV cache of `P + N` slots, then a `lax.while_loop` of decode steps (one token per row, the
MLP in the model's mode) until `max_new_tokens` or until every row has produced an EOS token.
P and N are rounded up to buckets, so calls with similar prompt and output lengths reuse one
compiled program; temperature, top-p, alpha and the step limit are data and never recompile.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from sparseinfer_jax import sharding
from sparseinfer_jax.config import alpha_per_layer
from sparseinfer_jax.errors import UserError
from sparseinfer_jax.mlp import STAT_FIELDS, check_mode
from sparseinfer_jax.model import KVCache, Llama
from sparseinfer_jax.sampling import sample

MIN_BUCKET = 16
STATS = (None, "predicted", "diagnostic")


def bucket(n: int) -> int:
    """Smallest power of two >= n, at least MIN_BUCKET."""
    return max(MIN_BUCKET, 1 << max(0, n - 1).bit_length())


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
    """Per-layer decode statistics, arrays `[L]`, summed over rows and decode steps."""

    predicted_sparsity: np.ndarray
    computed_fraction: np.ndarray
    true_sparsity: np.ndarray | None = None
    recall: np.ndarray | None = None
    precision: np.ndarray | None = None

    @classmethod
    def from_sums(
        cls, sums: np.ndarray, steps: int, num_neurons: int, diagnostic: bool
    ) -> LayerStats:
        s = dict(zip(STAT_FIELDS, np.asarray(sums, np.float64).T, strict=True))
        total = np.maximum(s["rows"] * num_neurons, 1)
        out = dict(
            predicted_sparsity=1 - s["predicted_active"] / total,
            computed_fraction=s["computed"] / max(steps * num_neurons, 1),
        )
        if diagnostic:
            out.update(
                true_sparsity=1 - s["true_active"] / total,
                recall=s["both_active"] / np.maximum(s["true_active"], 1),
                precision=s["both_active"] / np.maximum(s["predicted_active"], 1),
            )
        return cls(**out)


@dataclasses.dataclass(frozen=True)
class GenerationResult:
    """What `generate` returns.

    tokens: `[B, N]` new token ids; after a row's EOS (kept) the rest is the pad id.
    lengths: `[B]` new tokens per row, its EOS included.
    text: decoded new text per row when a tokenizer was given.
    """

    tokens: np.ndarray
    lengths: np.ndarray
    timing: Timing
    text: list[str] | None = None
    stats: LayerStats | None = None


_COMPILED: dict[Any, Any] = {}


def compilation_count() -> int:
    """Number of generation programs compiled in this process (one per bucket and setting)."""
    return len(_COMPILED)


def _program(
    state,
    tokens,
    pad,
    max_steps,
    temperature,
    top_p,
    alpha,
    key,
    *,
    graphdef,
    new_slots,
    mode,
    backend,
    stats,
    top_k,
    eos_ids,
    pad_id,
):
    """Prefill + decode loop. tokens `[B, P]` left-padded, pad `[B]` pad counts, key the PRNG
    key's raw data (`jax.random.key_data`)."""
    model: Llama = nnx.merge(graphdef, state)
    model.set_alphas(alpha)
    key = jax.random.wrap_key_data(key)
    cfg = model.config
    b, p = tokens.shape
    slots = jnp.arange(p + new_slots)
    valid = slots[None, :] >= pad[:, None]
    eos = jnp.asarray(eos_ids or (-1,), jnp.int32)

    cache = KVCache.zeros(cfg, b, p + new_slots, model.dtype)
    if model.mesh is not None:
        cache = jax.lax.with_sharding_constraint(cache, sharding.cache_sharding(cfg, model.mesh, b))
    positions = jnp.maximum(jnp.arange(p)[None, :] - pad[:, None], 0).astype(jnp.int32)
    mask = (slots[None, :] <= jnp.arange(p)[:, None])[None] & valid[:, None, :]
    hidden, cache, _ = model.forward(
        tokens, positions, mask, cache, 0, mode="dense", backend=backend
    )
    key, sub = jax.random.split(key)
    tok = sample(model.logits(hidden[:, -1:])[:, 0], sub, temperature, top_p, top_k=top_k)
    done = jnp.isin(tok, eos)
    out = jnp.full((b, new_slots), pad_id, jnp.int32).at[:, 0].set(tok)
    stat_sums = jnp.zeros((cfg.num_hidden_layers, len(STAT_FIELDS)), jnp.int32)

    def cond(carry):
        step, _, done, *_ = carry
        return (step < max_steps) & ~jnp.all(done)

    def body(carry):
        step, tok, done, cache, key, out, stat_sums = carry
        slot = p + step - 1
        positions = (slot - pad)[:, None].astype(jnp.int32)
        mask = ((slots <= slot)[None, :] & valid)[:, None, :]
        hidden, cache, layer_stats = model.forward(
            tok[:, None], positions, mask, cache, slot, mode=mode, backend=backend, stats=stats
        )
        key, sub = jax.random.split(key)
        new = sample(model.logits(hidden)[:, 0], sub, temperature, top_p, top_k=top_k)
        new = jnp.where(done, pad_id, new)
        out = jax.lax.dynamic_update_slice(out, new[:, None], (0, step))
        if stats is not None:
            stat_sums = stat_sums + layer_stats
        return step + 1, new, done | jnp.isin(new, eos), cache, key, out, stat_sums

    carry = (jnp.int32(1), tok, done, cache, key, out, stat_sums)
    steps, _, _, _, _, out, stat_sums = jax.lax.while_loop(cond, body, carry)
    return out, steps, stat_sums


def check_text(text: str, what: str) -> None:
    """Raises UserError when `text` cannot be UTF-8 (bytes that were not UTF-8 on the command
    line arrive as lone surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise UserError(
            f"{what} is not valid UTF-8 text (bad byte at character {e.start}); pass UTF-8 text."
        ) from None


def _memory_limit() -> int | None:
    """Bytes of the first device (its reported limit), or of the host's RAM on the CPU."""
    stats = jax.local_devices()[0].memory_stats() or {}
    if stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return None


def _check_length(model: Llama, ids: list[list[int]], max_new_tokens: int) -> None:
    """Prompt + new tokens within the model's positions, and a KV cache that can exist at all."""
    from sparseinfer_jax.calibration import position_limit
    from sparseinfer_jax.memory import ITEMSIZE, estimate_memory

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
                          dtype=name if name in ITEMSIZE else "float32")
    need, have = est.kv_cache_bytes + est.prefill_bytes, _memory_limit()
    shards = 1 if model.mesh is None else model.mesh.size
    if have and need / shards > have:
        raise UserError(
            f"{len(ids)} prompt(s) of up to {longest} tokens with max_new_tokens "
            f"{max_new_tokens} need a {need / 2**30:.1f} GiB KV cache, more than the "
            f"{have / 2**30:.1f} GiB of memory here; ask for fewer new tokens or fewer prompts."
        )


def _encode(prompts, tokenizer) -> list[list[int]]:
    if isinstance(prompts, str):
        prompts = [prompts]
    if isinstance(prompts, np.ndarray | jax.Array):
        prompts = np.asarray(prompts)
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


def check_sampling(temperature: float, top_p: float | None, top_k: int | None) -> None:
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


def _check(
    model: Llama,
    ids: list[list[int]],
    max_new_tokens: int,
    mode: str,
    backend: str,
    stats: str | None,
) -> None:
    if any(len(row) == 0 for row in ids):
        raise UserError("a prompt is empty after tokenisation; give at least one token per prompt.")
    vocab = model.config.vocab_size
    if any(not 0 <= t < vocab for row in ids for t in row):
        raise UserError(f"a prompt token id is outside the vocabulary [0, {vocab}).")
    if max_new_tokens < 1:
        raise UserError(f"max_new_tokens must be at least 1, got {max_new_tokens}.")
    if stats not in STATS:
        raise UserError(f"stats must be one of {STATS}, got {stats!r}.")
    check_mode(model.config, mode, backend)
    _check_length(model, ids, max_new_tokens)


def _alpha_array(model: Llama, alpha) -> jnp.ndarray:
    if alpha is None:
        return model.alphas()
    return jnp.asarray(alpha_per_layer(alpha, model.config.num_hidden_layers))


def generate(
    model: Llama,
    prompts,
    *,
    tokenizer=None,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    stop_at_eos: bool = True,
    mode: str | None = None,
    backend: str | None = None,
    alpha=None,
    stats: str | None = None,
    eos_token_ids: Sequence[int] | None = None,
    timing: bool = True,
) -> GenerationResult:
    """Generates continuations of a batch of prompts with one compiled program.

    Args:
      model: a `Llama` (from `sparseinfer_jax.load`).
      prompts: a string, a list of strings (needs `tokenizer`), or token ids (`[B, P]` or a list
        of lists of different lengths; they are left-padded).
      max_new_tokens: new tokens per row at most.
      temperature: 0 for greedy decoding; top_k / top_p restrict sampling.
      seed: PRNG seed for sampling.
      stop_at_eos: stop a row at the model's EOS token, and the whole loop when all rows have.
      mode, backend: decode-step MLP mode and kernel backend; default: the model's. Prefill is
        always dense.
      alpha: override of the per-layer conservativeness (a number or one per layer).
      stats: None, "predicted" or "diagnostic" (adds true sparsity, recall and precision).
      eos_token_ids: tokens that end a row; default: the model config's.
      timing: also time the prefill alone (runs it once more), to split prefill and decode time.
    Returns:
      A GenerationResult.
    """
    mode = mode or model.mode
    backend = backend or model.backend
    check_sampling(temperature, top_p, top_k)
    top_p = 1.0 if top_p is None else float(top_p)
    ids = _encode(prompts, tokenizer)
    _check(model, ids, max_new_tokens, mode, backend, stats)
    cfg = model.config
    eos_ids = (
        tuple(cfg.eos_token_ids if eos_token_ids is None else eos_token_ids) if stop_at_eos else ()
    )
    pad_id = cfg.pad_token_id if cfg.pad_token_id is not None else (cfg.eos_token_ids or (0,))[0]
    longest = max(len(row) for row in ids)
    p, n = bucket(longest), bucket(max_new_tokens)
    tokens = np.full((len(ids), p), pad_id, np.int32)
    for i, row in enumerate(ids):
        tokens[i, p - len(row) :] = row
    pad = np.asarray([p - len(row) for row in ids], np.int32)

    graphdef, state = nnx.split(model)
    statics = dict(
        new_slots=n,
        mode=mode,
        backend=backend,
        stats=stats,
        top_k=top_k,
        eos_ids=eos_ids,
        pad_id=int(pad_id),
    )
    data = (
        tokens,
        pad,
        np.int32(max_new_tokens),
        np.float32(temperature),
        np.float32(top_p),
        # Host arrays only: with several processes each one places its copy on the global mesh.
        np.asarray(_alpha_array(model, alpha)),
        np.asarray(jax.random.key_data(jax.random.key(seed))),
        np.int32(1),  # the step limit of the prefill-only timing run
    )
    jit_kwargs = {}
    if model.mesh is not None:  # rows over `data`; results replicated, so every host can read them
        rows, replicated = (
            sharding.batch_sharding(model.mesh, len(ids)),
            NamedSharding(model.mesh, P()),
        )
        data = jax.device_put(data, (rows, rows) + (replicated,) * 6)
        jit_kwargs["out_shardings"] = replicated
    else:
        data = jax.device_put(data)
    args, one_step = (state, *data[:-1]), data[-1]
    cache_key = (graphdef, tokens.shape, tuple(sorted(statics.items())))
    compile_s = 0.0
    if cache_key not in _COMPILED:
        start = time.perf_counter()
        program = jax.jit(functools.partial(_program, graphdef=graphdef, **statics), **jit_kwargs)
        _COMPILED[cache_key] = program.lower(*args).compile()
        compile_s = time.perf_counter() - start
    compiled = _COMPILED[cache_key]

    prefill_s = None
    if timing:
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args[:3], one_step, *args[4:]))
        prefill_s = time.perf_counter() - start
    start = time.perf_counter()
    out, steps, stat_sums = jax.block_until_ready(compiled(*args))
    total_s = time.perf_counter() - start

    steps = int(steps)
    out = np.asarray(out)[:, :steps]
    eos = np.isin(out, eos_ids)
    lengths = np.where(eos.any(axis=1), eos.argmax(axis=1) + 1, steps)
    decode = None
    if prefill_s is not None and steps > 1:
        decode = max(total_s - prefill_s, 0.0) / (steps - 1)
    layer_stats = None
    if stats is not None:
        layer_stats = LayerStats.from_sums(
            np.asarray(stat_sums), steps - 1, cfg.intermediate_size, stats == "diagnostic"
        )
    text = None
    if tokenizer is not None:
        text = [
            tokenizer.decode(row[:length].tolist())
            for row, length in zip(out, lengths, strict=True)
        ]
    return GenerationResult(
        tokens=out,
        lengths=lengths,
        text=text,
        stats=layer_stats,
        timing=Timing(compile_s, prefill_s, decode, total_s, steps),
    )
