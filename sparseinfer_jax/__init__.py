"""SparseInfer-JAX: ReLU-Llama inference in JAX that skips the MLP neurons predicted to be zero.

The public names load on first use (PEP 562), so `import sparseinfer_jax` alone does not import
jax: the console scripts (`sparseinfer_jax.console`) can then catch a Ctrl-C that lands while jax
is still importing.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sparseinfer_jax.api.loading import load, model_from_params
    from sparseinfer_jax.errors import UserError
    from sparseinfer_jax.model.config import LlamaConfig, config_from_hf_dict
    from sparseinfer_jax.model.llama import Llama
    from sparseinfer_jax.runtime.generation import generate
    from sparseinfer_jax.runtime.results import GenerationResult, LayerStats, Timing

_HOME = {
    "GenerationResult": "runtime.results",
    "LayerStats": "runtime.results",
    "Llama": "model.llama",
    "LlamaConfig": "model.config",
    "Timing": "runtime.results",
    "UserError": "errors",
    "config_from_hf_dict": "model.config",
    "generate": "runtime.generation",
    "load": "api.loading",
    "model_from_params": "api.loading",
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
