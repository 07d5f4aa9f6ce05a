"""Hugging Face Llama (safetensors) -> SparseInfer-JAX checkpoint conversion."""

from convert.converter import convert
from sparseinfer_jax.io.hf import convert_in_memory, stream

__all__ = ["convert", "convert_in_memory", "stream"]
