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

import functools
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
from sparseinfer_jax.model.config import LlamaConfig, alpha_per_layer
from sparseinfer_jax.model.llama import KVCache, Llama
from sparseinfer_jax.model.metrics import mlp_weights, predictor_share
from sparseinfer_jax.model.mlp import STAT_FIELDS, Sparsity
from sparseinfer_jax.model.positions import causal_inputs
from sparseinfer_jax.runtime.requests import (
    bucket,
    check_argument_types,
    check_request,
    check_sampling,
    check_seed,
    encode_prompts,
    follow_array,
)
from sparseinfer_jax.runtime.results import GenerationResult, LayerStats, Timing
from sparseinfer_jax.runtime.sampling import penalize_repeats, sample

# Streaming hands tokens over about this often: each call of the decode program runs as many
# steps as the measured step rate fits in it (one step while there is no rate yet).
STREAM_INTERVAL_S = 0.05


_COMPILED: dict[Any, Any] = {}


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
    state, tokens, pad, follow, temperature, top_p, penalty, key, *, graphdef, top_k,
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
    cache = KVCache.zeros(cfg, b, p + new_slots, model.dtype)
    if model.mesh is not None:
        cache = jax.lax.with_sharding_constraint(cache, sharding.cache_sharding(cfg, model.mesh, b))
    positions, mask = causal_inputs(pad, jnp.arange(p), p + new_slots)
    hidden, cache, _ = model.forward(
        tokens, positions, mask, cache, 0, sparsity=model.with_sparsity(mode="dense")
    )
    rows = jnp.arange(b)[:, None]
    counts = jnp.zeros((b, cfg.vocab_size), jnp.int32)
    real = jnp.arange(p)[None, :] >= pad[:, None]  # [B, P]: not left padding
    seen = counts.at[rows, tokens].add(real.astype(jnp.int32)) > 0
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
    state, cache, loop, pad, stop, temperature, top_p, penalty, alpha, *, graphdef, sparsity,
    stats, top_k, eos_ids, pad_id,
):
    """Decode steps (one token per row, the MLP as `sparsity` says) from `loop` until `stop` new
    tokens or every row's EOS; returns the cache and the loop state."""
    model: Llama = nnx.merge(graphdef, state)
    model.set_alphas(alpha)
    b, n = loop.out.shape
    p = cache.k[0].shape[1] - n
    eos = jnp.asarray(eos_ids or (-1,), jnp.int32)

    def cond(carry):
        _, loop = carry
        return (loop.step < stop) & ~jnp.all(loop.done)

    def body(carry):
        cache, loop = carry
        slot = p + loop.step - 1
        positions, mask = causal_inputs(pad, slot[None], p + n)
        hidden, cache, layer_stats = model.forward(
            loop.tok[:, None], positions, mask, cache, slot, sparsity=sparsity,
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
    check_argument_types(model, tokenizer, stream, max_new_tokens=max_new_tokens,
                         temperature=temperature, top_k=top_k, top_p=top_p,
                         repetition_penalty=repetition_penalty, stream_chunk=stream_chunk)
    sparsity = model.with_sparsity(mode=mode, backend=backend)
    if alpha is not None and sparsity.mode == "dense":
        raise UserError("alpha sets the sparse predictor, which dense mode does not use; pass "
                        "mode='sparse' or drop alpha.")
    check_sampling(temperature, top_p, top_k, repetition_penalty)
    check_seed(seed)
    ids = encode_prompts(prompts, tokenizer)
    check_request(model, ids, max_new_tokens, stats, stream_chunk)
    cfg = model.config
    eos_ids, pad_id = _special_ids(cfg, eos_token_ids, stop_at_eos)
    tokens, pad = _left_pad(ids, pad_id)
    n = bucket(max_new_tokens)
    programs = _Programs(model, tokens.shape, n, top_k=top_k, eos_ids=eos_ids, pad_id=pad_id)
    data = programs.place(
        tokens, pad, follow_array(follow, len(ids), n, max_new_tokens, cfg.vocab_size),
        temperature, 1.0 if top_p is None else top_p, repetition_penalty, seed,
        _alpha_array(model, alpha))
    cache, loop, prefill_s = programs.prefill(data, wait=timing)
    run = programs.decoder(data, cache, loop, sparsity=sparsity, stats=stats)
    decode_start = time.perf_counter()
    if stream is None:
        cache, loop = run(cache, loop, max_new_tokens)
    else:
        loop = _stream(run, cache, loop, max_new_tokens, stream_chunk, stream)
    jax.block_until_ready(loop)
    end, steps = time.perf_counter(), int(loop.step)
    decode_s = (end - decode_start) / (steps - 1) if prefill_s is not None and steps > 1 else None
    sparse = sparsity.mode == "sparse"
    share = predictor_share(cfg, *mlp_weights(model)) if sparse else 0.0
    return _result(loop, eos_ids, tokenizer, stats, cfg, share,
                   Timing(programs.compile_s, prefill_s, decode_s, end - programs.started, steps))


def _special_ids(cfg: LlamaConfig, eos_token_ids, stop_at_eos: bool) -> tuple[tuple, int]:
    """The ids that end a row (none without `stop_at_eos`) and the pad id (the config's, else
    its first EOS, else 0)."""
    eos_ids = (
        tuple(cfg.eos_token_ids if eos_token_ids is None else eos_token_ids) if stop_at_eos else ()
    )
    pad_id = cfg.pad_token_id if cfg.pad_token_id is not None else (cfg.eos_token_ids or (0,))[0]
    return eos_ids, int(pad_id)


def _left_pad(ids: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows of different lengths left-padded to a bucket: tokens `[B, P]` int32, pad `[B]`."""
    p = bucket(max(len(row) for row in ids))
    tokens = np.full((len(ids), p), pad_id, np.int32)
    for i, row in enumerate(ids):
        tokens[i, p - len(row) :] = row
    return tokens, np.asarray([p - len(row) for row in ids], np.int32)


class _Programs:
    """One generate call's prefill and decode programs (compiled once per bucket and static
    setting, kept in `_COMPILED`) and its data, placed on the model's devices."""

    def __init__(self, model: Llama, shape: tuple[int, int], n: int, **shared):
        self.graphdef, self.state = nnx.split(model)
        self.cfg, self.mesh, self.shape, self.n, self.shared = (
            model.config, model.mesh, shape, n, shared)
        self.compile_s = 0.0  # seconds spent compiling in this call
        self.started = 0.0  # when the prefill call began, after its compilation
        self.jit_kwargs: dict[str, Any] = {}
        self.put_scalar = jax.device_put
        if self.mesh is not None:  # rows over `data`; the loop state replicated for every host
            replicated = NamedSharding(self.mesh, P())
            caches = sharding.cache_sharding(self.cfg, self.mesh, shape[0])
            self.jit_kwargs["out_shardings"] = (caches, replicated)
            self.put_scalar = functools.partial(jax.device_put, device=replicated)

    def place(self, tokens, pad, follow, temperature, top_p, penalty, seed, alpha) -> tuple:
        """The call's data as device arrays: tokens, pad, follow, temperature, top_p, penalty,
        the PRNG key's raw data and alpha."""
        data = (tokens, pad, follow, np.float32(temperature), np.float32(top_p),
                np.float32(penalty),
                # Host arrays only: with several processes each one places its copy on the mesh.
                np.asarray(jax.random.key_data(jax.random.key(seed))), np.asarray(alpha))
        if self.mesh is None:
            return jax.device_put(data)
        rows = sharding.batch_sharding(self.mesh, self.shape[0])
        replicated = NamedSharding(self.mesh, P())
        return jax.device_put(data, (rows, rows, rows) + (replicated,) * 5)

    def compiled(self, name: str, fn, statics: dict, args: tuple, **jit_extra):
        """`fn` with `statics` bound, compiled for `args` (once per process and setting)."""
        cache_key = (name, self.graphdef, self.shape, self.n, tuple(sorted(statics.items())))
        if cache_key not in _COMPILED:
            start = time.perf_counter()
            jitted = jax.jit(functools.partial(fn, graphdef=self.graphdef, **statics),
                             **self.jit_kwargs, **jit_extra)
            _COMPILED[cache_key] = jitted.lower(*args).compile()
            self.compile_s += time.perf_counter() - start
        return _COMPILED[cache_key]

    def prefill(self, data: tuple, *, wait: bool) -> tuple[KVCache, DecodeState, float | None]:
        """Runs the prefill: the KV cache, the loop state after the first new token, and with
        `wait` the seconds it ran (waiting for it, to time prefill and decode apart)."""
        tokens, pad, follow, temperature, top_p, penalty, key, _ = data
        args = (self.state, tokens, pad, follow, temperature, top_p, penalty, key)
        prefill = self.compiled("prefill", _prefill, self.shared, args)
        self.started = time.perf_counter()
        cache, loop = prefill(*args)
        if not wait:
            return cache, loop, None
        jax.block_until_ready(loop)
        return cache, loop, time.perf_counter() - self.started

    def decoder(self, data: tuple, cache, loop, *, sparsity: Sparsity, stats: str | None):
        """`run(cache, loop, stop)`: the decode program from `loop` until step `stop`."""
        _, pad, _, temperature, top_p, penalty, _, alpha = data
        rest = (temperature, top_p, penalty, alpha)
        args = (self.state, cache, loop, pad, self.put_scalar(np.int32(1)), *rest)
        # The cache is donated, so each call updates it in place; the small loop state is not,
        # so the host can read one call's tokens while the next call runs.
        statics = dict(sparsity=sparsity, stats=stats, **self.shared)
        decode = self.compiled("decode", _decode, statics,
                               args, donate_argnums=(1,))

        def run(cache, loop, stop: int):
            return decode(self.state, cache, loop, pad, self.put_scalar(np.int32(stop)), *rest)

        return run


def _result(loop: DecodeState, eos_ids, tokenizer, stats: str | None, cfg: LlamaConfig,
            share: float, timing: Timing) -> GenerationResult:
    """The GenerationResult of a finished decode loop."""
    steps = timing.new_tokens
    out = np.asarray(loop.out)[:, :steps]
    eos = np.isin(out, eos_ids)
    lengths = np.where(eos.any(axis=1), eos.argmax(axis=1) + 1, steps)
    layer_stats = None
    if stats is not None:
        layer_stats = LayerStats.from_sums(np.asarray(loop.stat_sums), steps - 1,
                                           cfg.intermediate_size, stats == "diagnostic", share)
    text = None
    if tokenizer is not None:
        text = [tokenizer.decode(row[:length].tolist())
                for row, length in zip(out, lengths, strict=True)]
    return GenerationResult(tokens=out, lengths=lengths, agreed=np.asarray(loop.agreed),
                            text=text, stats=layer_stats, timing=timing)


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
