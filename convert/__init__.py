"""Hugging Face Llama (safetensors) -> SparseInfer-JAX checkpoint conversion."""

from convert.converter import convert, convert_in_memory, stream

__all__ = ["convert", "convert_in_memory", "stream"]
