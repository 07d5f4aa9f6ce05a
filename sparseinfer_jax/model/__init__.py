"""The model: config, the Flax NNX Llama, MLP modes, RoPE, matmuls, sharding, memory sizes."""

from sparseinfer_jax.model.config import LlamaConfig, config_from_hf_dict
from sparseinfer_jax.model.llama import Llama

__all__ = ["Llama", "LlamaConfig", "config_from_hf_dict"]
