"""SparseInfer-JAX: ReLU-Llama inference in JAX that skips the MLP neurons predicted to be zero."""

from sparseinfer_jax.config import LlamaConfig, config_from_hf_dict
from sparseinfer_jax.errors import UserError
from sparseinfer_jax.generation import GenerationResult, LayerStats, Timing, generate
from sparseinfer_jax.loading import load, model_from_params
from sparseinfer_jax.model import Llama

__all__ = [
    "GenerationResult",
    "LayerStats",
    "Llama",
    "LlamaConfig",
    "Timing",
    "UserError",
    "config_from_hf_dict",
    "generate",
    "load",
    "model_from_params",
]
