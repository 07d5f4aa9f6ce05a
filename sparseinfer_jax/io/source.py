"""Where a Hugging Face model comes from: a local folder, or a hub id downloaded to the cache.

Its tensors are read by `sparseinfer_jax.tensorfiles.SafetensorsFolder`, one at a time.
"""

from __future__ import annotations

import os
import re
from typing import Any

from sparseinfer_jax.errors import UserError
from sparseinfer_jax.io.jsonfile import read_json_object
from sparseinfer_jax.io.tensorfiles import SafetensorsFolder

__all__ = ["SafetensorsFolder", "resolve_source", "read_hf_config", "TOKENIZER_FILES"]

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "generation_config.json")
HUB_PATTERNS = ["*.json", "*.safetensors", *TOKENIZER_FILES]
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def resolve_source(src: str | os.PathLike) -> str:
    """A local model folder as is, or a Hugging Face Hub id `org/name` downloaded to the cache."""
    src = os.fspath(src)
    if os.path.isdir(src):
        return src
    if os.path.exists(src):
        raise UserError(f"{src} is a file; pass the model folder that holds config.json.")
    if os.path.islink(src):
        try:
            os.stat(src)
        except OSError as e:  # a loop of links, or one whose target is gone or unreachable
            raise UserError(f"{src} is a link that leads nowhere ({e.strerror}); pass the model "
                            "folder itself.") from None
    if not HUB_ID.fullmatch(src):
        raise UserError(f"{src} does not exist; pass a Hugging Face model folder or a hub id "
                        "like org/name.")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise UserError(f"{src} is not a local folder and huggingface_hub is not installed; "
                        "install it (pip install huggingface_hub) or pass a local "
                        "folder.") from None
    try:
        return snapshot_download(src, allow_patterns=HUB_PATTERNS)
    except Exception as e:  # any download failure (HTTP, network, auth, offline)
        raise UserError(f"{src} is not a local folder and could not be downloaded from the "
                        f"Hugging Face Hub ({type(e).__name__}); check the id, your network and "
                        "login, or pass a local folder.") from None


def read_hf_config(folder: str | os.PathLike) -> dict[str, Any]:
    """The dict of `folder/config.json` (an HF folder's or a checkpoint's, block included)."""
    return read_json_object(os.path.join(folder, "config.json"),
                            missing="point to a Hugging Face model folder",
                            remedy="download it again")
