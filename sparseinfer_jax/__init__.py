"""SparseInfer-JAX: ReLU-Llama inference in JAX that skips the MLP neurons predicted to be zero.

The public names load on first use (PEP 562), so `import sparseinfer_jax` alone does not import
jax: the console scripts (`sparseinfer_jax.console`) can then catch a Ctrl-C that lands while jax
is still importing.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sparseinfer_jax.config import LlamaConfig, config_from_hf_dict
    from sparseinfer_jax.errors import UserError
    from sparseinfer_jax.generation import GenerationResult, LayerStats, Timing, generate
    from sparseinfer_jax.loading import load, model_from_params
    from sparseinfer_jax.model import Llama

_HOME = {
    "GenerationResult": "generation",
    "LayerStats": "generation",
    "Llama": "model",
    "LlamaConfig": "config",
    "Timing": "generation",
    "UserError": "errors",
    "config_from_hf_dict": "config",
    "generate": "generation",
    "load": "loading",
    "model_from_params": "loading",
}

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


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module 'sparseinfer_jax' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"sparseinfer_jax.{_HOME[name]}"), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
