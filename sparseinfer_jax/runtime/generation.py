"""Text generation: a compiled prefill, then the whole decode loop in one compiled program.

The prefill program takes left-padded prompts `[B, P]`, runs a dense forward pass that fills a
statically shaped KV cache of `P + N` slots and samples the first new token. The decode program
runs a `lax.while_loop` of decode steps (one token per row, the MLP in the model's mode) until a
step limit or until every row has produced an EOS token; it donates the cache, so it updates in
place. Without streaming the decode is one call up to `max_new_tokens`; when streaming it is a
few calls of the same program, with the loop state carried between
them. P and N are rounded up to buckets, so calls with similar prompt and output lengths reuse
the compiled programs; temperature, top-p, the repetition penalty, alpha and the step limit are
data and never recompile.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from sparseinfer_jax.errors import UserError
from sparseinfer_jax.model import sharding
from sparseinfer_jax.model.config import alpha_per_layer
from sparseinfer_jax.model.llama import KVCache, Llama
from sparseinfer_jax.model.mlp import STAT_FIELDS, bytes_fraction, check_mode, predictor_share
from sparseinfer_jax.runtime.sampling import penalize_repeats, sample

MIN_BUCKET = 16
# Streaming hands tokens over about this often: each call of the decode program runs as many
# steps as the measured step rate fits in it (one step while there is no rate yet).
STREAM_INTERVAL_S = 0.05
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
    """Per-layer decode statistics, arrays `[L]`, summed over rows and decode steps.

    computed_fraction: gate rows read per step over F (the union of the rows' candidates);
    fired_fraction: up and down rows read per step over F (the candidates that fired);
    mlp_bytes_fraction: MLP bytes read per step over the dense MLP's, predictor included
    (`mlp.bytes_fraction`).
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
        total = np.maximum(s["rows"] * num_neurons, 1)
        per_step = max(steps * num_neurons, 1)
        out = dict(
            predicted_sparsity=1 - s["predicted_active"] / total,
            computed_fraction=s["computed"] / per_step,
            fired_fraction=s["fired"] / per_step,
            mlp_bytes_fraction=bytes_fraction(
                s["computed"] / per_step, s["fired"] / per_step, 1, share
            ),
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


_COMPILED: dict[Any, Any] = {}


def compilation_count() -> int:
    """Number of generation programs compiled in this process: a prefill and a decode program
    per bucket and setting (dense and sparse decoding share the prefill)."""
    return len(_COMPILED)


class DecodeState(NamedTuple):
    """The decode loop's state between compiled calls (the KV cache travels beside it, donated).

    step: `[]` int32, new tokens produced so far (the prefill produces the first).
    tok: `[B]` int32, each row's last token.
    done: `[B]` bool, rows that produced an EOS.
    key: the PRNG key of the next step.
    out: `[B, N]` int32 new tokens; the pad id after a row's EOS and beyond `step`.
    seen: `[B, V]` bool, the tokens of each row's prompt and output (for the repetition penalty).
    follow: `[B, N]` int32 tokens to emit instead of the model's choice where >= 0 (-1: free).
    agreed: `[B]` int32, steps whose emitted token is the one the model chose itself.
    stat_sums: `[L, len(STAT_FIELDS)]` int32 MLP statistics summed over decode steps.
    """

    step: jax.Array
    tok: jax.Array
    done: jax.Array
    key: jax.Array
    out: jax.Array
    seen: jax.Array
    follow: jax.Array
    agreed: jax.Array
    stat_sums: jax.Array


def _next_token(model: Llama, hidden, seen, key, follow, temperature, top_p, penalty, top_k):
    """Samples `[B]` tokens from the last hidden states `[B, D]` unless `follow [B]` (>= 0)
    gives them; returns the tokens, whether they are the model's own choice, and the next key."""
    key, sub = jax.random.split(key)
    logits = penalize_repeats(model.logits(hidden), seen, penalty)
    own = sample(logits, sub, temperature, top_p, top_k=top_k)
    tok = jnp.where(follow >= 0, follow, own)
    return tok, own == tok, key


def _prefill(
    state, tokens, pad, follow, temperature, top_p, penalty, key, *, graphdef, backend, top_k,
    eos_ids, pad_id,
):
    """Dense prefill of left-padded `tokens [B, P]` (`pad [B]` pad counts) into a cache of
    `P + N` slots (`follow: [B, N]`); returns the cache and the state after the first new token.
    `key` is the PRNG key's raw data (`jax.random.key_data`): a host array, so that with several
    processes each one places its copy on the global mesh.
    """
    model: Llama = nnx.merge(graphdef, state)
    key = jax.random.wrap_key_data(key)
    cfg = model.config
    b, p = tokens.shape
    new_slots = follow.shape[1]
    slots = jnp.arange(p + new_slots)
    valid = slots[None, :] >= pad[:, None]
    cache = KVCache.zeros(cfg, b, p + new_slots, model.dtype)
    if model.mesh is not None:
        cache = jax.lax.with_sharding_constraint(cache, sharding.cache_sharding(cfg, model.mesh, b))
    positions = jnp.maximum(jnp.arange(p)[None, :] - pad[:, None], 0).astype(jnp.int32)
    mask = (slots[None, :] <= jnp.arange(p)[:, None])[None] & valid[:, None, :]
    hidden, cache, _ = model.forward(
        tokens, positions, mask, cache, 0, mode="dense", backend=backend
    )
    rows = jnp.arange(b)[:, None]
    counts = jnp.zeros((b, cfg.vocab_size), jnp.int32)
    seen = counts.at[rows, tokens].add(valid[:, :p].astype(jnp.int32)) > 0
    tok, agreed, key = _next_token(
        model, hidden[:, -1], seen, key, follow[:, 0], temperature, top_p, penalty, top_k
    )
    state = DecodeState(
        step=jnp.int32(1),
        tok=tok,
        done=jnp.isin(tok, jnp.asarray(eos_ids or (-1,), jnp.int32)),
        key=key,
        out=jnp.full((b, new_slots), pad_id, jnp.int32).at[:, 0].set(tok),
        seen=seen.at[rows[:, 0], tok].set(True),
        follow=follow,
        agreed=agreed.astype(jnp.int32),
        stat_sums=jnp.zeros((cfg.num_hidden_layers, len(STAT_FIELDS)), jnp.int32),
    )
    return cache, state


def _decode(
    state, cache, loop, pad, stop, temperature, top_p, penalty, alpha, *, graphdef, mode,
    backend, stats, top_k, eos_ids, pad_id,
):
    """Decode steps (one token per row, the MLP in `mode`) from `loop` until `stop` new tokens
    or every row's EOS; returns the cache and the loop state."""
    model: Llama = nnx.merge(graphdef, state)
    model.set_alphas(alpha)
    b, n = loop.out.shape
    p = cache.k[0].shape[1] - n
    slots = jnp.arange(p + n)
    valid = slots[None, :] >= pad[:, None]
    eos = jnp.asarray(eos_ids or (-1,), jnp.int32)

    def cond(carry):
        _, loop = carry
        return (loop.step < stop) & ~jnp.all(loop.done)

    def body(carry):
        cache, loop = carry
        slot = p + loop.step - 1
        positions = (slot - pad)[:, None].astype(jnp.int32)
        mask = ((slots <= slot)[None, :] & valid)[:, None, :]
        hidden, cache, layer_stats = model.forward(
            loop.tok[:, None], positions, mask, cache, slot, mode=mode, backend=backend,
            stats=stats,
        )
        follow = jax.lax.dynamic_index_in_dim(loop.follow, loop.step, axis=1, keepdims=False)
        new, agreed, key = _next_token(
            model, hidden[:, 0], loop.seen, loop.key, follow, temperature, top_p, penalty, top_k
        )
        agreed = loop.agreed + (agreed & ~loop.done)
        new = jnp.where(loop.done, pad_id, new)
        stat_sums = loop.stat_sums if stats is None else loop.stat_sums + layer_stats
        loop = DecodeState(
            step=loop.step + 1,
            tok=new,
            done=loop.done | jnp.isin(new, eos),
            key=key,
            out=jax.lax.dynamic_update_slice(loop.out, new[:, None], (0, loop.step)),
            seen=loop.seen.at[jnp.arange(b), new].set(True),
            follow=loop.follow,
            agreed=agreed,
            stat_sums=stat_sums,
        )
        return cache, loop

    return jax.lax.while_loop(cond, body, (cache, loop))


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


def _check_length(model: Llama, ids: list[list[int]], max_new_tokens: int) -> None:
    """Prompt + new tokens within the model's positions, and a KV cache that can exist at all."""
    from sparseinfer_jax.io.text import position_limit
    from sparseinfer_jax.model.memory import ITEMSIZE, estimate_memory

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
    need, have = est.kv_cache_bytes + est.prefill_bytes, memory_limit()
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


def check_seed(seed) -> None:
    """Raises UserError unless `seed` is a whole number that fits a PRNG key (int64)."""
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or not (
        -(2**63) <= int(seed) < 2**63
    ):
        raise UserError(f"seed must be a whole number in [-2**63, 2**63), got {seed!r}.")


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


def _follow_array(follow, rows: int, slots: int, max_new_tokens: int, vocab: int) -> np.ndarray:
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
    repetition_penalty: float = 1.0,
    seed: int = 0,
    stop_at_eos: bool = True,
    mode: str | None = None,
    backend: str | None = None,
    alpha=None,
    stats: str | None = None,
    eos_token_ids: Sequence[int] | None = None,
    timing: bool = True,
    follow=None,
    stream: Callable[[np.ndarray], None] | None = None,
    stream_chunk: int | None = None,
) -> GenerationResult:
    """Generates continuations of a batch of prompts with two compiled programs.

    Args:
      model: a `Llama` (from `sparseinfer_jax.load`).
      prompts: a string, a list of strings (needs `tokenizer`), or token ids (`[B, P]` or a list
        of lists of different lengths; they are left-padded).
      max_new_tokens: new tokens per row at most.
      temperature: 0 for greedy decoding; top_k / top_p restrict sampling.
      repetition_penalty: >= 1, transformers' rule for tokens already in the row (1 = off).
      seed: PRNG seed for sampling.
      stop_at_eos: stop a row at the model's EOS token, and the whole loop when all rows have.
      mode, backend: decode-step MLP mode and kernel backend; default: the model's. Prefill is
        always dense.
      alpha: override of the per-layer conservativeness (a number or one per layer).
      stats: None, "predicted" or "diagnostic" (adds true sparsity, recall and precision).
      eos_token_ids: tokens that end a row; default: the model config's.
      timing: wait for the prefill before starting the decode, to time the two apart.
      follow: token ids per row (`[B, k]`, or lists of at most `max_new_tokens`) to emit instead
        of the model's own choices, e.g. another mode's output: the model then decodes the same
        text, and `GenerationResult.agreed` counts the steps where it would have chosen the same
        token (with the same seed, so the same sampling noise).
      stream: called with each run of new tokens `[B, k]` (numpy; the pad id after a row's EOS)
        as soon as the host has them. The decode loop then runs as calls of the same compiled
        program, each `stream_chunk` steps (default: what fits in `STREAM_INTERVAL_S` at the
        measured step rate); the next call is queued before the tokens of the last are handed
        over, so the device does not wait for the host.
    Returns:
      A GenerationResult.
    """
    mode = mode or model.mode
    backend = backend or model.backend
    check_sampling(temperature, top_p, top_k)
    check_seed(seed)
    top_p = 1.0 if top_p is None else float(top_p)
    ids = _encode(prompts, tokenizer)
    _check(model, ids, max_new_tokens, mode, backend, stats)
    if not (math.isfinite(repetition_penalty) and repetition_penalty >= 1):
        raise UserError(
            f"repetition_penalty must be a finite number >= 1 (1 = off), got {repetition_penalty}."
        )
    if stream_chunk is not None and stream_chunk < 1:
        raise UserError(f"stream_chunk must be at least 1, got {stream_chunk}.")
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
    forced = _follow_array(follow, len(ids), n, max_new_tokens, cfg.vocab_size)

    graphdef, state = nnx.split(model)
    shared = dict(backend=backend, top_k=top_k, eos_ids=eos_ids, pad_id=int(pad_id))
    data = (
        tokens,
        pad,
        forced,
        np.float32(temperature),
        np.float32(top_p),
        np.float32(repetition_penalty),
        # Host arrays only: with several processes each one places its copy on the global mesh.
        np.asarray(jax.random.key_data(jax.random.key(seed))),
        np.asarray(_alpha_array(model, alpha)),
    )
    jit_kwargs = {}
    put_scalar = jax.device_put
    if model.mesh is not None:  # rows over `data`; the loop state replicated: every host reads it
        rows = sharding.batch_sharding(model.mesh, len(ids))
        replicated = NamedSharding(model.mesh, P())
        data = jax.device_put(data, (rows, rows, rows) + (replicated,) * 5)
        caches = sharding.cache_sharding(cfg, model.mesh, len(ids))
        jit_kwargs["out_shardings"] = (caches, replicated)
        put_scalar = functools.partial(jax.device_put, device=replicated)
    else:
        data = jax.device_put(data)
    tokens_d, pad_d, forced_d, temperature_d, top_p_d, penalty_d, key_d, alpha_d = data

    compile_s = 0.0

    def compiled(name, fn, statics, args, **jit_extra):
        nonlocal compile_s
        cache_key = (name, graphdef, tokens.shape, n, tuple(sorted(statics.items())))
        if cache_key not in _COMPILED:
            start = time.perf_counter()
            jitted = jax.jit(
                functools.partial(fn, graphdef=graphdef, **statics), **jit_kwargs, **jit_extra
            )
            _COMPILED[cache_key] = jitted.lower(*args).compile()
            compile_s += time.perf_counter() - start
        return _COMPILED[cache_key]

    prefill_args = (state, tokens_d, pad_d, forced_d, temperature_d, top_p_d, penalty_d, key_d)
    prefill = compiled("prefill", _prefill, shared, prefill_args)
    start = time.perf_counter()
    cache, loop = prefill(*prefill_args)
    prefill_s = None
    if timing:
        jax.block_until_ready(loop)
        prefill_s = time.perf_counter() - start

    decode_statics = dict(mode=mode, stats=stats, **shared)
    decode_args = (state, cache, loop, pad_d, put_scalar(np.int32(max_new_tokens)),
                   temperature_d, top_p_d, penalty_d, alpha_d)
    # The cache is donated, so each call updates it in place; the small loop state is not, so
    # the host can read one call's tokens while the next call runs.
    decode = compiled("decode", _decode, decode_statics, decode_args, donate_argnums=(1,))

    def run(cache, loop, stop: int):
        return decode(state, cache, loop, pad_d, put_scalar(np.int32(stop)), *decode_args[5:])

    decode_start = time.perf_counter()
    if stream is None:
        cache, loop = run(cache, loop, max_new_tokens)
    else:
        loop = _stream(run, cache, loop, max_new_tokens, stream_chunk, stream)
    jax.block_until_ready(loop)
    end = time.perf_counter()

    steps = int(loop.step)
    out = np.asarray(loop.out)[:, :steps]
    eos = np.isin(out, eos_ids)
    lengths = np.where(eos.any(axis=1), eos.argmax(axis=1) + 1, steps)
    decode_s = None
    if prefill_s is not None and steps > 1:
        decode_s = (end - decode_start) / (steps - 1)
    layer_stats = None
    if stats is not None:
        share = predictor_share(cfg, jnp.dtype(model.dtype).itemsize) if mode == "sparse" else 0.0
        layer_stats = LayerStats.from_sums(
            np.asarray(loop.stat_sums), steps - 1, cfg.intermediate_size, stats == "diagnostic",
            share,
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
        agreed=np.asarray(loop.agreed),
        text=text,
        stats=layer_stats,
        timing=Timing(compile_s, prefill_s, decode_s, end - start, steps),
    )


def _stream(
    run, cache, loop: DecodeState, max_new_tokens: int, chunk: int | None, stream
) -> DecodeState:
    """Runs the decode as calls of `chunk` steps (None: sized to `STREAM_INTERVAL_S`), handing
    each call's new tokens to `stream`; returns the final loop state."""
    handed, stop, rate = 0, 1, None
    start = time.perf_counter()
    while True:
        following = None
        if stop < max_new_tokens:  # queued before reading `loop`, so the device keeps working
            size = chunk or (1 if rate is None else max(1, int(rate * STREAM_INTERVAL_S)))
            stop = min(stop + size, max_new_tokens)
            cache, following = run(cache, loop, stop)
        step, done = int(loop.step), np.asarray(loop.done)
        if step > 1:  # decode steps per second so far
            rate = (step - 1) / (time.perf_counter() - start)
        if step > handed:
            stream(np.asarray(loop.out)[:, handed:step])
            handed = step
        if following is None or done.all():
            return loop if following is None else following
        loop = following
