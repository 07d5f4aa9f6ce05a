"""Reading a Hugging Face safetensors checkpoint one tensor at a time.

Headers are checked with the safetensors library: `safe_open` validates the JSON header and that
the file covers every tensor's bytes, so a truncated or corrupt shard fails before any conversion
work. The data is then read with plain `readinto` at the header's offsets rather than
`get_tensor`: `safe_open` maps the whole file, and every page read through the mapping stays in the
process's RSS until the file is closed (a 10 GB shard shows up as 10 GB of RSS), while `read` goes
through the page cache without being charged to the process. The header's dtypes map to numpy
(bfloat16 through ml_dtypes, as safetensors' own numpy framework does), so torch is never needed.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Iterator

import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open

from sparseinfer_jax.errors import UserError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "generation_config.json")
HUB_PATTERNS = ["*.json", "*.safetensors", *TOKENIZER_FILES]
# safetensors stores little-endian data.
FLOAT_DTYPES = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
                "BF16": np.dtype(ml_dtypes.bfloat16)}
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def resolve_source(src: str | os.PathLike) -> str:
    """A local model folder as is, or a Hugging Face Hub id `org/name` downloaded to the cache."""
    src = os.fspath(src)
    if os.path.isdir(src):
        return src
    if os.path.exists(src):
        raise UserError(f"{src} is a file; pass the model folder that holds config.json.")
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


def _check_file(path: str) -> dict[str, tuple[tuple[int, ...], str]]:
    """Validates a safetensors file with the library; returns {name: (shape, dtype code)}."""
    try:
        with safe_open(path, framework="numpy") as f:
            return {n: (tuple(f.get_slice(n).get_shape()), f.get_slice(n).get_dtype())
                    for n in f.keys()}
    except (SafetensorError, OSError) as e:
        raise UserError(f"{path} is not a readable safetensors file ({e}); download it "
                        "again.") from None


def _data_offsets(path: str) -> dict[str, int]:
    """{name: absolute byte offset of its data} from the header `_check_file` validated."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    return {n: 8 + size + t["data_offsets"][0] for n, t in header.items() if n != "__metadata__"}


class SafetensorsFolder:
    """The tensors of `model.safetensors` or of the shards listed in `model.safetensors.index.json`.

    Opening reads every header (not the data) and records each tensor's file and shape.
    """

    def __init__(self, folder: str):
        self.folder = folder
        self.files: dict[str, str] = {}  # tensor name -> file path
        self.shapes: dict[str, tuple[int, ...]] = {}
        self._dtypes: dict[str, np.dtype] = {}
        self._offsets: dict[str, int] = {}
        index = os.path.join(folder, INDEX_FILE)
        if os.path.isfile(index):
            weight_map = self._read_index(index)
        elif os.path.isfile(os.path.join(folder, SINGLE_FILE)):
            weight_map = None
        else:
            raise UserError(f"{folder} has no {SINGLE_FILE} or {INDEX_FILE}; only safetensors "
                            "checkpoints are supported (re-save the model with save_pretrained).")
        files = sorted(set(weight_map.values())) if weight_map else [SINGLE_FILE]
        for file in files:
            path = os.path.join(folder, file)
            if not os.path.isfile(path):
                raise UserError(f"{INDEX_FILE} lists {file} but {folder} does not have it; "
                                "download the missing shard.")
            tensors = _check_file(path)
            offsets = _data_offsets(path)
            for name, (shape, dtype) in tensors.items():
                if weight_map is not None and weight_map.get(name) != file:
                    continue  # the index decides which file holds a tensor
                if dtype not in FLOAT_DTYPES:
                    raise UserError(f"tensor '{name}' in {path} has dtype {dtype}; only float "
                                    "checkpoints are supported.")
                self.files[name] = path
                self.shapes[name] = shape
                self._dtypes[name] = FLOAT_DTYPES[dtype]
                self._offsets[name] = offsets[name]
        for name, file in (weight_map or {}).items():
            if name not in self.files:
                raise UserError(f"{INDEX_FILE} lists tensor '{name}' in {file} but that file does "
                                "not contain it; download the shard again.")

    @staticmethod
    def _read_index(path: str) -> dict[str, str]:
        try:
            with open(path) as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise UserError(f"{path} is not a valid safetensors index (no 'weight_map'); "
                            "download it again.") from None
        return weight_map

    def read(self, names: Iterable[str]) -> Iterator[tuple[str, np.ndarray]]:
        """Yields `(name, array)` one tensor at a time, a file at a time."""
        by_file: dict[str, list[str]] = {}
        for name in names:
            by_file.setdefault(self.files[name], []).append(name)
        for path, file_names in by_file.items():
            with open(path, "rb") as f:
                for name in file_names:
                    x = np.empty(self.shapes[name], self._dtypes[name])
                    f.seek(self._offsets[name])
                    if f.readinto(x.reshape(-1).view(np.uint8)) != x.nbytes:
                        raise UserError(f"{path} ended inside tensor '{name}'; it changed while "
                                        "being read, download it again.")
                    yield name, x
