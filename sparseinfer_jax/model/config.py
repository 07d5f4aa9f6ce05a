"""Model configuration: a frozen dataclass built from a Hugging Face Llama `config.json`."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

import pallas_kernels as pk
from sparseinfer_jax.errors import UserError

# The ReLU family (exact zeros, so SparseInfer applies) is the kernels' list; silu runs dense.
ACTIVATIONS = (*pk.ACTIVATIONS, "silu")
ROPE_TYPES = ("default", "linear", "dynamic", "llama3")
ARCHITECTURES = ("LlamaForCausalLM", "SparseLlamaForCausalLM")
MODEL_TYPES = ("llama", "sparsellama")
# ProSparse stores the FATReLU threshold in this field of config.json.
FATRELU_THRESHOLD_FIELD = "hidden_act_param"


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """RoPE settings, from `rope_theta` + `rope_scaling` or from `rope_parameters`."""

    rope_type: str = "default"
    theta: float = 10000.0
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int | None = None


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Static architecture of a Llama model (hashable, so it can be a static jit argument)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 2048
    rope: RopeConfig = RopeConfig()
    hidden_act: str = "relu"
    act_threshold: float = 0.0
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None

    @property
    def is_relu_family(self) -> bool:
        """True when the activation leaves exact zeros, so SparseInfer applies."""
        return self.hidden_act in pk.ACTIVATIONS

    @property
    def sign_words(self) -> int:
        """uint32 words per packed sign-bit row of W_gate: ceil(hidden_size / 32)."""
        return pk.num_words(self.hidden_size)

    def to_hf_dict(self) -> dict[str, Any]:
        """The Hugging Face `config.json` fields this config was built from."""
        rope_parameters: dict[str, Any] = {
            "rope_type": self.rope.rope_type,
            "rope_theta": self.rope.theta,
        }
        if self.rope.rope_type != "default":
            rope_parameters["factor"] = self.rope.factor
        if self.rope.rope_type == "llama3":
            rope_parameters["low_freq_factor"] = self.rope.low_freq_factor
            rope_parameters["high_freq_factor"] = self.rope.high_freq_factor
        if self.rope.original_max_position_embeddings is not None:
            rope_parameters["original_max_position_embeddings"] = (
                self.rope.original_max_position_embeddings
            )
        out: dict[str, Any] = {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "rope_theta": self.rope.theta,
            "rope_parameters": rope_parameters,
            "hidden_act": self.hidden_act,
            "attention_bias": False,
            "mlp_bias": False,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_ids),
            "pad_token_id": self.pad_token_id,
        }
        if self.hidden_act == "fatrelu":
            out[FATRELU_THRESHOLD_FIELD] = self.act_threshold
        return out


_MISSING = object()
_KINDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string",
          dict: "an object", list: "a list"}


def _field(hf: dict[str, Any], name: str, kind: type, default: Any = _MISSING, *,
           where: str = "") -> Any:
    """`hf[name]` checked to be of `kind` (int, float, bool, str, dict or list); null or absent
    gives `default` (absent and no default: an error). Errors name the field."""
    value = hf.get(name)
    if value is None:
        if default is _MISSING:
            raise UserError(f"config.json has no '{where}{name}' field (or it is null); is this a "
                            "Llama checkpoint?")
        return default
    ok = (isinstance(value, (int, float)) if kind is float else isinstance(value, kind))
    if ok and kind is not bool and isinstance(value, bool):
        ok = False
    if not ok:
        raise UserError(f"config.json field '{where}{name}' must be {_KINDS[kind]}, got "
                        f"{value!r}; fix config.json.")
    return float(value) if kind is float else value


def _positive_number(hf: dict[str, Any], name: str, default: float, *, where: str = ""
                     ) -> float:
    """A float field that must be finite and above 0 (an epsilon, a RoPE base)."""
    value = _field(hf, name, float, default, where=where)
    if not (math.isfinite(value) and value > 0):
        raise UserError(f"config.json field '{where}{name}' must be a positive number, got "
                        f"{value}; fix config.json.")
    return value


def _positive(hf: dict[str, Any], name: str, default: Any = _MISSING) -> int:
    value = _field(hf, name, int, default)
    if value is not None and value < 1:
        raise UserError(f"config.json field '{name}' must be at least 1, got {value}.")
    return value


def _rope_params(hf: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """The RoPE settings and the field they came from; both fields given must agree."""
    new = _field(hf, "rope_parameters", dict, None)
    old = _field(hf, "rope_scaling", dict, None)
    theta = _field(hf, "rope_theta", float, None)
    if new is None:
        params = dict(old or {})
        params.setdefault("rope_theta", 10000.0 if theta is None else theta)
        return params, "rope_scaling"
    legacy = {("rope_type" if k == "type" else k): v for k, v in (old or {}).items()}
    if theta is not None:
        legacy["rope_theta"] = theta
    new_type = new.get("rope_type", new.get("type", "default"))
    for key, value in legacy.items():
        mine = new_type if key == "rope_type" else new.get(key)
        if mine is not None and mine != value:
            raise UserError(
                f"config.json fields 'rope_parameters' and 'rope_scaling'/'rope_theta' disagree "
                f"on '{key}' ({mine!r} vs {value!r}); keep only one of them."
            )
    return new, "rope_parameters"


def _rope_config(hf: dict[str, Any], max_positions: int) -> RopeConfig:
    """Reads RoPE from `rope_parameters` (transformers >= 5) or `rope_theta` + `rope_scaling`."""
    params, where = _rope_params(hf)
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise UserError(
            f"config.json field '{where}.rope_type' is '{rope_type}'; "
            f"supported types are {', '.join(ROPE_TYPES)}."
        )
    at = f"{where}."
    factor = _field(params, "factor", float, 1.0, where=at)
    if rope_type != "default" and not factor >= 1.0:
        raise UserError(f"config.json field '{where}.factor' must be >= 1, got {factor}.")
    original = _field(params, "original_max_position_embeddings", int, None, where=at)
    if rope_type == "llama3" and original is None:
        raise UserError(
            f"config.json field '{where}.original_max_position_embeddings' is "
            "required for llama3 rope scaling."
        )
    return RopeConfig(
        rope_type=rope_type,
        theta=_positive_number(params, "rope_theta", 10000.0, where=at),
        factor=factor,
        low_freq_factor=_field(params, "low_freq_factor", float, 1.0, where=at),
        high_freq_factor=_field(params, "high_freq_factor", float, 4.0, where=at),
        original_max_position_embeddings=original,
    )


def _token_id(hf: dict[str, Any], name: str) -> int | None:
    return _field(hf, name, int, None)


def _eos_ids(hf: dict[str, Any]) -> tuple[int, ...]:
    value = hf.get("eos_token_id")
    values = value if isinstance(value, list) else [] if value is None else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise UserError(f"config.json field 'eos_token_id' must be an integer or a list of "
                        f"integers, got {value!r}; fix config.json.")
    return tuple(values)


def config_from_hf_dict(hf: dict[str, Any]) -> LlamaConfig:
    """Builds a LlamaConfig from the dict of an HF `config.json`.

    Raises:
      UserError: naming the field, for anything this project cannot run (unknown architecture,
        activation or rope type, attention or MLP bias, inconsistent head sizes).
    """
    if not isinstance(hf, dict):
        raise UserError(f"config.json must hold a JSON object, got {type(hf).__name__}.")
    architectures = _field(hf, "architectures", list, [])
    if any(a not in ARCHITECTURES for a in architectures):
        raise UserError(
            f"config.json field 'architectures' is {architectures}; only Llama-architecture "
            "models (LlamaForCausalLM) are supported."
        )
    model_type = _field(hf, "model_type", str, "llama")
    if model_type not in MODEL_TYPES:
        raise UserError(
            f"config.json field 'model_type' is '{model_type}'; only 'llama' models are supported."
        )
    for bias in ("attention_bias", "mlp_bias"):
        if _field(hf, bias, bool, False):
            raise UserError(
                f"config.json field '{bias}' is true; biased Llama layers are not supported."
            )
    act = _field(hf, "hidden_act", str, "silu")
    if act not in ACTIVATIONS:
        raise UserError(
            f"config.json field 'hidden_act' is '{act}'; supported are {', '.join(ACTIVATIONS)}."
        )
    threshold = 0.0
    if act == "fatrelu":
        threshold = _field(hf, FATRELU_THRESHOLD_FIELD, float, 0.0)

    hidden = _positive(hf, "hidden_size")
    heads = _positive(hf, "num_attention_heads")
    kv_heads = _positive(hf, "num_key_value_heads", heads)
    if heads % kv_heads:
        raise UserError(
            f"config.json field 'num_key_value_heads' ({kv_heads}) must divide "
            f"'num_attention_heads' ({heads})."
        )
    head_dim = _positive(hf, "head_dim", None)
    if head_dim is None:
        if hidden % heads:
            raise UserError(
                f"config.json field 'hidden_size' ({hidden}) is not a multiple of "
                f"'num_attention_heads' ({heads}) and 'head_dim' is not given."
            )
        head_dim = hidden // heads
    if int(head_dim) % 2:
        raise UserError(f"config.json field 'head_dim' must be even for RoPE, got {head_dim}.")
    max_positions = _positive(hf, "max_position_embeddings", 2048)
    return LlamaConfig(
        vocab_size=_positive(hf, "vocab_size"),
        hidden_size=hidden,
        intermediate_size=_positive(hf, "intermediate_size"),
        num_hidden_layers=_positive(hf, "num_hidden_layers"),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=int(head_dim),
        rms_norm_eps=_positive_number(hf, "rms_norm_eps", 1e-6),
        tie_word_embeddings=_field(hf, "tie_word_embeddings", bool, False),
        max_position_embeddings=max_positions,
        rope=_rope_config(hf, max_positions),
        hidden_act=act,
        act_threshold=threshold,
        bos_token_id=_token_id(hf, "bos_token_id"),
        eos_token_ids=_eos_ids(hf),
        pad_token_id=_token_id(hf, "pad_token_id"),
    )


PREDICTORS = ("sign", "signmag")


def default_alpha(num_layers: int) -> list[float]:
    """The alpha a freshly converted checkpoint gets: 1.0 per layer (the paper's plain majority)."""
    return [1.0] * num_layers


def alpha_per_layer(alpha: Any, num_layers: int) -> np.ndarray:
    """Checks alpha (one positive number or one per layer; inf keeps all) -> `[L]` float32."""
    try:
        a = np.asarray(alpha, np.float32)
    except (TypeError, ValueError):  # a string, a ragged list
        raise UserError(f"alpha must be a positive number or {num_layers} positive numbers, one "
                        f"per layer, got {alpha!r}.") from None
    if a.ndim == 0:
        a = np.full((num_layers,), a)
    if a.shape != (num_layers,) or np.any(np.isnan(a)) or np.any(a <= 0):
        raise UserError(
            f"alpha must be a positive number or {num_layers} positive numbers, one per layer."
        )
    return a
