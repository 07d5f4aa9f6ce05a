"""Llama in Flax NNX: a list of decoder layers, each holding its own arrays.

The layers are not stacked on a leading `[L]` axis and scanned: inside a scan each layer's weights
are a slice of the stack, and XLA (on the CPU at least) copies that slice before every matvec,
which made a decode step copy the whole model (`benchmarks/layer_stack.py`: 5x slower than
separate arrays). A Python loop over separate arrays costs compile time linear in depth instead.
Checkpoints store the same per-layer arrays, so loading never splits or stacks.
Per-layer alpha is read and set as an `[L]` array with `Llama.alphas` / `Llama.set_alphas`.
Shapes: B batch, T tokens in this call, S KV-cache slots, D hidden, H heads, K kv heads, hd
head_dim, V vocab, L layers.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from sparseinfer_jax.errors import UserError
from sparseinfer_jax.model.config import LlamaConfig, alpha_per_layer
from sparseinfer_jax.model.mlp import MLP, Sparsity
from sparseinfer_jax.model.positions import causal_inputs, position_limit
from sparseinfer_jax.model.quant import dot as qdot
from sparseinfer_jax.model.quant import quantized_param
from sparseinfer_jax.model.rope import apply_rope, rope_tables
from sparseinfer_jax.model.sharding import as_mesh


class KVCache(NamedTuple):
    """Keys and values, one `[B, S, K, hd]` array per layer in each tuple; rotated keys as in HF."""

    k: tuple[jnp.ndarray, ...]
    v: tuple[jnp.ndarray, ...]

    @classmethod
    def zeros(cls, cfg: LlamaConfig, batch: int, slots: int, dtype: jnp.dtype) -> KVCache:
        shape = (batch, slots, cfg.num_key_value_heads, cfg.head_dim)
        layers = range(cfg.num_hidden_layers)
        return cls(*(tuple(jnp.zeros(shape, dtype) for _ in layers) for _ in "kv"))


class RMSNorm(nnx.Module):
    """HF LlamaRMSNorm: normalise in float32, cast back, then scale."""

    def __init__(self, dim: int, eps: float, *, dtype: jnp.dtype):
        self.weight = nnx.Param(jnp.ones((dim,), dtype))
        self.eps = eps

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.weight[...] * x32.astype(x.dtype)


class Linear(nnx.Module):
    """A bias-free linear layer holding HF's `(out, in)` weight: `x @ weight.T`.

    HF's layout, not `nnx.Linear`'s `(in, out)`: XLA's CPU matvec reads a matrix faster when it
    contracts the matrix's last (contiguous) axis (a `[2048, 2048]` float32 one: 43.6 against
    30.0 GB/s). Keeping the attention and LM head weights this way made a 1b x 8 layer float32
    decode step 3.6 ms faster dense and 2.3 ms faster sparse on the 2-core CPU (medians of five
    runs, benchmarks/RESULTS.md, 2026-11-29). On a GPU it compiles to the same program size with
    no weight copies (offline H100 compile, 7b x 2 layers).
    """

    def __init__(self, din: int, dout: int, *, dtype: jnp.dtype, rngs: nnx.Rngs,
                 quantize: str | None = None):
        # Drawn as `nnx.Linear` draws its kernel, then transposed: the same seed gives the same
        # initial weights as an `nnx.Linear`.
        kernel = nnx.initializers.normal(0.02)(rngs.params(), (din, dout), dtype)
        self.weight, self.weight_scale = quantized_param(kernel.T, quantize)

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        """`x: [..., in]` -> `[..., out]` in x's dtype (the weights' when not quantised), through
        `quant.dot` (no float32 weight copies on the CPU)."""
        scale = None if self.weight_scale is None else self.weight_scale[...]
        return qdot(x, self.weight[...], scale, 1).astype(x.dtype)


class Attention(nnx.Module):
    """Grouped-query attention with RoPE, over a KV cache when one is given."""

    def __init__(self, cfg: LlamaConfig, *, dtype: jnp.dtype, rngs: nnx.Rngs,
                 quantize: str | None = None):
        d, h, k, hd = (
            cfg.hidden_size,
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        )
        q = dict(dtype=dtype, rngs=rngs, quantize=quantize)
        self.q_proj = Linear(d, h * hd, **q)
        self.k_proj = Linear(d, k * hd, **q)
        self.v_proj = Linear(d, k * hd, **q)
        self.o_proj = Linear(h * hd, d, **q)
        self.num_heads, self.num_kv_heads, self.head_dim = h, k, hd

    def __call__(self, x, cos, sin, mask, cache=None, cache_index=None):
        """Attends `x: [B, T, D]` to itself, or to the cache after writing its keys there.

        Args:
          mask: `[B, T, S]` bool, True where a query may see a key slot.
          cache: this layer's `(k, v)`, each `[B, S, K, hd]`, or None for a cache-free forward.
        Returns:
          `[B, T, D]` and the updated `(k, v)` (None without a cache).
        """
        b, t, _ = x.shape
        heads = (b, t, self.num_heads, self.head_dim)
        kv_heads = (b, t, self.num_kv_heads, self.head_dim)
        q = apply_rope(self.q_proj(x).reshape(heads), cos, sin)
        k = apply_rope(self.k_proj(x).reshape(kv_heads), cos, sin)
        v = self.v_proj(x).reshape(kv_heads)
        if cache is not None:
            k = jax.lax.dynamic_update_slice(cache[0], k, (0, cache_index, 0, 0))
            v = jax.lax.dynamic_update_slice(cache[1], v, (0, cache_index, 0, 0))
        groups = self.num_heads // self.num_kv_heads
        q = q.reshape(b, t, self.num_kv_heads, groups, self.head_dim)
        scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32)
        scores = scores * (self.head_dim**-0.5)
        scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        out = jnp.einsum("bkgts,bskd->btkgd", probs, v, preferred_element_type=jnp.float32)
        out = out.astype(x.dtype).reshape(b, t, self.num_heads * self.head_dim)
        out = self.o_proj(out)
        return out, (None if cache is None else (k, v))


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: LlamaConfig, *, dtype: jnp.dtype, rngs: nnx.Rngs,
                 quantize: str | None = None):
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype)
        self.self_attn = Attention(cfg, dtype=dtype, rngs=rngs, quantize=quantize)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype)
        self.mlp = MLP(cfg, dtype=dtype, rngs=rngs, quantize=quantize)

    def __call__(self, x, cos, sin, mask, cache, cache_index, *, sparsity, stats, mesh):
        attn, cache = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, cache_index)
        x = x + attn
        mlp, layer_stats = self.mlp(
            self.post_attention_layernorm(x), sparsity=sparsity, stats=stats, mesh=mesh
        )
        return x + mlp, cache, layer_stats


class Llama(nnx.Module):
    """A Llama causal LM. `model(input_ids)` returns logits `[B, T, V]` like `LlamaForCausalLM`."""

    def __init__(
        self,
        cfg: LlamaConfig,
        *,
        dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
        mode: str = "dense",
        backend: str = "auto",
        quantize: str | None = None,
    ):
        """`quantize`: None, or "int8": every linear weight int8 with per-row scales
        (`model/quant.py`); the embeddings stay in `dtype`, the compute dtype."""
        self.config = cfg
        self.quantize = quantize
        self.sparsity = Sparsity(mode, backend)
        self.mesh = None
        self.embed_tokens = nnx.Embed(
            cfg.vocab_size, cfg.hidden_size, dtype=dtype, param_dtype=dtype, rngs=rngs
        )
        self.layers = nnx.List(
            [DecoderLayer(cfg, dtype=dtype, rngs=rngs, quantize=quantize)
             for _ in range(cfg.num_hidden_layers)]
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype)
        if not cfg.tie_word_embeddings:
            self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, dtype=dtype, rngs=rngs,
                                  quantize=quantize)

    @property
    def mesh(self):
        """The `(data, model)` device mesh the arrays live on (`sharding.shard_model`), or None."""
        return self._mesh

    @mesh.setter
    def mesh(self, mesh) -> None:
        # Any mesh a user built (jax.make_mesh's Explicit axes, one axis) becomes the Auto
        # (data, model) mesh that generation and the sharded MLP expect.
        self._mesh = None if mesh is None else as_mesh(mesh)

    @property
    def mode(self) -> str:
        """The decode-step MLP mode (`sparsity.mode`; setting it replaces the setting)."""
        return self.sparsity.mode

    @mode.setter
    def mode(self, mode: str) -> None:
        self.sparsity = self.with_sparsity(mode=mode)

    @property
    def backend(self) -> str:
        """The sparse kernels' backend (`sparsity.backend`; setting it replaces the setting)."""
        return self.sparsity.backend

    @backend.setter
    def backend(self, backend: str) -> None:
        self.sparsity = self.with_sparsity(backend=backend)

    def with_sparsity(self, **changes) -> Sparsity:
        """The model's `sparsity` with the fields in `changes` that are not None replaced,
        checked against the config (UserError for a bad value)."""
        changes = {k: v for k, v in changes.items() if v is not None}
        return dataclasses.replace(self.sparsity, **changes).check(self.config)

    @property
    def dtype(self) -> jnp.dtype:
        return self.embed_tokens.embedding.dtype

    def alphas(self) -> jnp.ndarray:
        """Every layer's alpha, `[L]` float32."""
        return jnp.stack([jnp.asarray(layer.mlp.alpha[...], jnp.float32) for layer in self.layers])

    def set_alphas(self, values) -> None:
        """Sets every layer's alpha from `values`: one positive number, or `[L]` of them (data: a
        change never recompiles). UserError for another length, a NaN or a value <= 0."""
        if not isinstance(values, jax.core.Tracer):  # inside a compiled step: checked before
            values = alpha_per_layer(values, len(self.layers))
        values = jnp.asarray(values, jnp.float32)
        for i, layer in enumerate(self.layers):
            layer.mlp.alpha.value = values[i]

    def embed(self, input_ids: jnp.ndarray) -> jnp.ndarray:
        """`self.embed_tokens(input_ids)`: `[B, T]` -> `[B, T, D]`.

        XLA's CPU backend gathers bf16 rows from a float32 copy of the table
        (float-normalization-bf16); in the decode loop that copy is loop-invariant, so XLA would
        hoist it out and keep it alive. Tying the table to the ids in a barrier makes it
        loop-variant: the convert stays inside the gather's fusion and touches only the rows read.
        """
        table, input_ids = jax.lax.optimization_barrier(
            (self.embed_tokens.embedding[...], input_ids)
        )
        return jnp.take(table, input_ids, axis=0)

    def logits(self, x: jnp.ndarray) -> jnp.ndarray:
        """Final norm and LM head: `[B, T, D]` -> `[B, T, V]` float32."""
        x = self.norm(x)
        if self.config.tie_word_embeddings:
            return qdot(x, self.embed_tokens.embedding[...], None, 1)
        head = self.lm_head
        scale = None if head.weight_scale is None else head.weight_scale[...]
        return qdot(x, head.weight[...], scale, 1)

    def forward(
        self,
        input_ids,
        positions,
        mask,
        cache: KVCache | None = None,
        cache_index=None,
        *,
        sparsity: Sparsity | None = None,
        stats: str | None = None,
    ):
        """The decoder stack.

        Args:
          input_ids: `[B, T]` int32.
          positions: `[B, T]` int32 RoPE positions.
          mask: `[B, T, S]` bool attention mask (S = T without a cache).
          cache: KV cache to read and update at `cache_index`, or None.
          sparsity: how the MLPs run (static; default: the model's own `sparsity`).
          stats: the MLP's (static), see `MLP.__call__`.
        Returns:
          hidden states `[B, T, D]`, the updated cache (or None) and per-layer stats `[L, 6]`
          (or None).
        """
        x = self.embed(input_ids)
        cos, sin = rope_tables(self.config, positions)
        keys, values, all_stats = [], [], []
        for i, layer in enumerate(self.layers):
            layer_cache = None if cache is None else (cache.k[i], cache.v[i])
            x, layer_cache, layer_stats = layer(
                x,
                cos,
                sin,
                mask,
                layer_cache,
                cache_index,
                sparsity=sparsity or self.sparsity,
                stats=stats,
                mesh=self.mesh,
            )
            if cache is not None:
                keys.append(layer_cache[0])
                values.append(layer_cache[1])
            all_stats.append(layer_stats)
        new_cache = None if cache is None else KVCache(tuple(keys), tuple(values))
        return x, new_cache, (None if stats is None else jnp.stack(all_stats))

    def __call__(
        self,
        input_ids: jnp.ndarray,
        attention_mask: jnp.ndarray | None = None,
        *,
        mode: str | None = None,
        backend: str | None = None,
    ) -> jnp.ndarray:
        """Full forward without a cache: `input_ids: [B, T]` -> logits `[B, T, V]` float32.

        `attention_mask: [B, T]` (1 = token, 0 = left padding) as in transformers; mode and backend
        default to the model's.
        """
        check_input_ids(input_ids, self.config.vocab_size, attention_mask)
        b, t = input_ids.shape
        limit = position_limit(self.config)
        if t < 1 or (limit is not None and t > limit):
            raise UserError(f"the model takes 1 to {limit or 'any number of'} tokens per row "
                            f"(its positions: max_position_embeddings), got {t}.")
        pad = (jnp.zeros((b,), jnp.int32) if attention_mask is None
               else t - jnp.sum(attention_mask != 0, axis=1, dtype=jnp.int32))
        positions, mask = causal_inputs(pad, jnp.arange(t), t)
        x, _, _ = self.forward(
            input_ids, positions, mask, sparsity=self.with_sparsity(mode=mode, backend=backend)
        )
        return self.logits(x)


def check_input_ids(input_ids, vocab_size: int, attention_mask=None) -> None:
    """UserError unless `input_ids` is a `[B, T]` integer array (and `attention_mask`, if any, of
    the same shape); when the ids are concrete (not traced), also unless each is in the
    vocabulary: a gather clamps an id out of range, which would return logits silently."""
    shape, dtype = getattr(input_ids, "shape", None), getattr(input_ids, "dtype", None)
    if shape is None:
        raise UserError("the model takes ids as an integer array of shape [batch, tokens], got "
                        f"a {type(input_ids).__name__}: pass np.asarray(ids).")
    if len(shape) != 2:
        raise UserError(f"the model takes ids of shape [batch, tokens], got shape {shape}; "
                        "for one sequence add a batch axis: ids[None].")
    if not jnp.issubdtype(dtype, jnp.integer):
        raise UserError(f"token ids must be integers, got an array of {dtype}.")
    if attention_mask is not None and tuple(jnp.shape(attention_mask)) != tuple(shape):
        raise UserError(f"attention_mask has shape {tuple(jnp.shape(attention_mask))}, the ids "
                        f"{tuple(shape)}: give one 0/1 entry per token.")
    if not isinstance(input_ids, jax.core.Tracer) and input_ids.size:
        low, high = int(jnp.min(input_ids)), int(jnp.max(input_ids))
        if low < 0 or high >= vocab_size:
            bad = low if low < 0 else high
            raise UserError(f"token id {bad} is outside the vocabulary [0, {vocab_size}).")
