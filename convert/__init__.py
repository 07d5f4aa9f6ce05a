"""Hugging Face Llama (safetensors) -> SparseInfer-JAX checkpoint conversion."""

from convert.converter import convert, convert_in_memory

__all__ = ["convert", "convert_in_memory"]
