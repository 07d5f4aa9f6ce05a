"""Checkpoint I/O: safetensors files, our checkpoint folders, Hugging Face folders and names,
tokenizers and text files."""
