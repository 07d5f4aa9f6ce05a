"""The one table mapping Hugging Face Llama tensor names to our checkpoint's params tree.

HF stores linear weights as (out, in), and so do the attention projections and the LM head here
(`model.Linear`: XLA's CPU matvec is faster on that layout), so they are copied as they are. The
MLP keeps one contiguous row per neuron: `gate` and `up` are HF's (F, D) as is, and `down_t` is
HF's down_proj (D, F) transposed to (F, D). Paths are the model's own (`nnx.to_pure_dict` of a
`Llama`): per-layer tensors live at `("layers", i, ...)`, one array per layer, never stacked. In a
checkpoint's orbax tree the keys are strings (`layers/3/mlp/gate`, io/params.py).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator
from typing import Any

from sparseinfer_jax.model.config import LlamaConfig

LAYER = "{i}"


@dataclasses.dataclass(frozen=True)
class Entry:
    """One HF tensor kind: its name, where it goes, its HF shape and whether it is transposed.

    `dims` names the HF axes: V vocab, D hidden, F intermediate, Q heads * head_dim,
    K kv_heads * head_dim.
    """

    hf: str
    path: tuple[str, ...]
    dims: str
    transpose: bool = False

    @property
    def per_layer(self) -> bool:
        return LAYER in self.hf


TABLE = (
    Entry("model.embed_tokens.weight", ("embed_tokens", "embedding"), "VD"),
    Entry("model.norm.weight", ("norm", "weight"), "D"),
    Entry("lm_head.weight", ("lm_head", "weight"), "VD"),
    Entry("model.layers.{i}.input_layernorm.weight", ("layers", "input_layernorm", "weight"), "D"),
    Entry("model.layers.{i}.post_attention_layernorm.weight",
          ("layers", "post_attention_layernorm", "weight"), "D"),
    Entry("model.layers.{i}.self_attn.q_proj.weight",
          ("layers", "self_attn", "q_proj", "weight"), "QD"),
    Entry("model.layers.{i}.self_attn.k_proj.weight",
          ("layers", "self_attn", "k_proj", "weight"), "KD"),
    Entry("model.layers.{i}.self_attn.v_proj.weight",
          ("layers", "self_attn", "v_proj", "weight"), "KD"),
    Entry("model.layers.{i}.self_attn.o_proj.weight",
          ("layers", "self_attn", "o_proj", "weight"), "DQ"),
    Entry("model.layers.{i}.mlp.gate_proj.weight", ("layers", "mlp", "gate"), "FD"),
    Entry("model.layers.{i}.mlp.up_proj.weight", ("layers", "mlp", "up"), "FD"),
    Entry("model.layers.{i}.mlp.down_proj.weight", ("layers", "mlp", "down_t"), "DF",
          transpose=True),
)
LM_HEAD = "lm_head.weight"
# Packed sign bits of each layer's gate rows, [F, ceil(D/32)] uint32, computed from its gate.
SIGN_BITS_SOURCE = ("mlp", "gate")
SIGN_BITS = ("mlp", "gate_sign_bits")
# Buffers some exporters save that carry no weights.
IGNORED = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")


Path = tuple  # of str and, for a layer, its int index


@dataclasses.dataclass(frozen=True)
class Target:
    """Where one concrete HF tensor goes: its entry, its layer (None if not per layer), and the
    HF shape it must have."""

    entry: Entry
    layer: int | None
    shape: tuple[int, ...]

    @property
    def hf(self) -> str:
        """Its HF tensor name."""
        layer = self.layer
        return self.entry.hf if layer is None else self.entry.hf.replace(LAYER, str(layer))

    @property
    def path(self) -> Path:
        """Its path in the model's params tree."""
        p = self.entry.path
        return p if self.layer is None else (p[0], self.layer, *p[1:])


def _sizes(cfg: LlamaConfig) -> dict[str, int]:
    return {"V": cfg.vocab_size, "D": cfg.hidden_size, "F": cfg.intermediate_size,
            "Q": cfg.num_attention_heads * cfg.head_dim,
            "K": cfg.num_key_value_heads * cfg.head_dim}


def entries(cfg: LlamaConfig) -> tuple[Entry, ...]:
    """The table for this config (without `lm_head` when the embeddings are tied)."""
    return tuple(e for e in TABLE if not (cfg.tie_word_embeddings and e.hf == LM_HEAD))


def hf_targets(cfg: LlamaConfig) -> dict[str, Target]:
    """Every HF tensor name this config needs -> its target, with the expected HF shape."""
    sizes = _sizes(cfg)
    targets = {}
    for e in entries(cfg):
        shape = tuple(sizes[d] for d in e.dims)
        layers = range(cfg.num_hidden_layers) if e.per_layer else [None]
        for i in layers:
            target = Target(e, i, shape)
            targets[target.hf] = target
    return targets


def to_hf(params: dict, cfg: LlamaConfig) -> Iterator[tuple[str, Any]]:
    """The table read backwards: (HF name, array in HF's layout) for every tensor HF needs, from a
    params tree (`nnx.to_pure_dict` of a `Llama`). The sign bits, which HF lacks, are left out."""
    for name, target in hf_targets(cfg).items():
        a = params
        for key in target.path:
            a = a[key]
        yield name, (a.T if target.entry.transpose else a)


def is_ignored(name: str, cfg: LlamaConfig) -> bool:
    """True for HF tensors that are present in some checkpoints but carry nothing we need."""
    # A tied lm_head, when saved anyway, is a copy of the embedding.
    return bool(IGNORED.fullmatch(name)) or (cfg.tie_word_embeddings and name == LM_HEAD)


def out_order(cfg: LlamaConfig) -> list[tuple[Path, tuple[int, ...], Target | None]]:
    """Every leaf of the params tree (no alpha) in checkpoint order: the non-layer tensors, then
    each layer's, its sign bits right after its gate. Each with its shape and HF target (None for
    the sign bits, computed from the gate)."""
    by_layer: dict[int | None, list] = {}
    for target in hf_targets(cfg).values():
        shape = target.shape[::-1] if target.entry.transpose else target.shape
        rows = by_layer.setdefault(target.layer, [])
        rows.append((target.path, shape, target))
        if target.entry.path[1:] == SIGN_BITS_SOURCE:
            bits = (target.layer, *SIGN_BITS)
            rows.append((("layers", *bits), (cfg.intermediate_size, cfg.sign_words), None))
    return [row for layer in by_layer for row in by_layer[layer]]
