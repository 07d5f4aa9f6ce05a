"""Model shapes for benchmarks and random-weight models of them."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from sparseinfer_jax.api.loading import model_from_params
from sparseinfer_jax.errors import UserError
from sparseinfer_jax.io import names
from sparseinfer_jax.model import dtypes
from sparseinfer_jax.model.config import LlamaConfig
from sparseinfer_jax.model.llama import Llama

# hidden, intermediate, heads, kv heads, head_dim, layers, vocab (TinyLlama-1.1B, Llama-2-7B and
# -13B).
SHAPES = {
    "tiny": dict(hidden_size=256, intermediate_size=1024, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=64, num_hidden_layers=4, vocab_size=4096),
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_attention_heads=32,
               num_key_value_heads=4, head_dim=64, num_hidden_layers=22, vocab_size=32000),
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
               num_key_value_heads=32, head_dim=128, num_hidden_layers=32, vocab_size=32000),
    "13b": dict(hidden_size=5120, intermediate_size=13824, num_attention_heads=40,
                num_key_value_heads=40, head_dim=128, num_hidden_layers=40, vocab_size=32000),
}


DTYPES = dtypes.STORED  # the dtypes a random model is built in


MODES = ("dense", "sparse")


PROMPT_TOKENS = 8


INIT_STD = 0.02


def shape_config(shape: str, layers: int | None = None) -> LlamaConfig:
    """The `LlamaConfig` of a named shape of `SHAPES`, its depth cut to `layers` if given."""
    if shape not in SHAPES:
        raise UserError(f"--shape must be one of {', '.join(SHAPES)}, got '{shape}'.")
    fields = dict(SHAPES[shape])
    if layers is not None:
        if not 1 <= layers <= fields["num_hidden_layers"]:
            raise UserError(f"--layers cuts {shape}'s depth: give 1 to "
                            f"{fields['num_hidden_layers']}, got {layers}.")
        fields["num_hidden_layers"] = layers
    return LlamaConfig(**fields, rms_norm_eps=1e-5, max_position_embeddings=4096,
                       hidden_act="relu", bos_token_id=1, eos_token_ids=(2,), pad_token_id=0)


@functools.partial(jax.jit, static_argnames=["shape", "dtype"])
def _normal(key, shape, dtype):
    return (INIT_STD * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


def random_model(cfg: LlamaConfig, dtype: str = "float32", *, seed: int = 0,
                 quantize: str | None = None) -> Llama:
    """A `Llama` with N(0, 0.02) weights and unit norms, one `jax.random` call per array; with
    `quantize` ("int8") its linear weights quantised as they are placed."""
    np_dtype = dtypes.lookup(dtype, allowed=DTYPES, flag="--dtype")
    params: dict[str, Any] = {}
    key = jax.random.key(seed)
    for path, shape, target in names.out_order(cfg):
        if target is None:  # the gate's sign bits: model_from_params packs them
            continue
        key, sub = jax.random.split(key)
        node = params
        for k in path[:-1]:
            node = node.setdefault(k, {})
        is_norm = len(shape) == 1  # the RMSNorm scales; every matrix is random
        node[path[-1]] = (jnp.ones(shape, np_dtype) if is_norm
                          else _normal(sub, shape, np_dtype))
    return model_from_params(cfg, params, dtype=np_dtype, quantize=quantize)
