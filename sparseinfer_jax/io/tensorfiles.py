"""Safetensors folders, one tensor at a time: the reader of Hugging Face checkpoints.

Headers are checked with the safetensors library: `safe_open` validates the JSON header and that
the file covers every tensor's bytes, so a truncated or corrupt file fails before any work. The
data is then read with plain `readinto` at the header's offsets rather than `get_tensor`:
`safe_open` maps the whole file, and every page read through the mapping stays in the process's
RSS until the file is closed (a 10 GB shard shows up as 10 GB of RSS), while `read` goes through
the page cache without being charged to the process. The header's dtypes map to numpy (bfloat16
through ml_dtypes, as safetensors' own numpy framework does), so torch is never needed.
"""

from __future__ import annotations

import json
import os

import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open

from sparseinfer_jax.errors import UserError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# safetensors stores little-endian data; HF checkpoints hold floats.
DTYPES = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype(ml_dtypes.bfloat16)}
REMEDY = "download it again"


def _check_file(path: str) -> dict[str, tuple[tuple[int, ...], str]]:
    """Validates a safetensors file with the library; returns {name: (shape, dtype code)}."""
    try:
        with safe_open(path, framework="numpy") as f:
            return {n: (tuple(f.get_slice(n).get_shape()), f.get_slice(n).get_dtype())
                    for n in f.keys()}
    except (SafetensorError, OSError) as e:
        raise UserError(f"{path} is not a readable safetensors file ({e}); {REMEDY}.") from None


def _data_offsets(path: str) -> dict[str, int]:
    """{name: absolute byte offset of its data} from the header `_check_file` validated."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    return {n: 8 + size + t["data_offsets"][0] for n, t in header.items() if n != "__metadata__"}


class SafetensorsFolder:
    """The tensors of `model.safetensors` or of the shards listed in `model.safetensors.index.json`.

    Opening reads every header (not the data) and records each tensor's file, shape and dtype.
    """

    def __init__(self, folder: str):
        self.folder = folder
        self.files: dict[str, str] = {}  # tensor name -> file path
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, np.dtype] = {}
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
                                f"{REMEDY}.")
            tensors = _check_file(path)
            offsets = _data_offsets(path)
            for name, (shape, code) in tensors.items():
                if weight_map is not None and weight_map.get(name) != file:
                    continue  # the index decides which file holds a tensor
                if code not in DTYPES:
                    raise UserError(f"tensor '{name}' in {path} has dtype {code}; only float "
                                    "checkpoints are supported.")
                self.files[name] = path
                self.shapes[name] = shape
                self.dtypes[name] = DTYPES[code]
                self._offsets[name] = offsets[name]
        for name, file in (weight_map or {}).items():
            if name not in self.files:
                raise UserError(f"{INDEX_FILE} lists tensor '{name}' in {file} but that file does "
                                f"not contain it; {REMEDY}.")

    @staticmethod
    def _read_index(path: str) -> dict[str, str]:
        try:
            with open(path) as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
            weight_map = None
        if not isinstance(weight_map, dict) or not all(
                isinstance(v, str) for v in weight_map.values()):
            raise UserError(f"{path} is not a valid safetensors index (its 'weight_map' must map "
                            f"tensor names to file names); {REMEDY}.")
        return weight_map

    def read(self, name: str) -> np.ndarray:
        """The tensor `name`, read into a fresh array (nothing of the file stays mapped)."""
        path = self.files[name]
        x = np.empty(self.shapes[name], self.dtypes[name])
        with open(path, "rb") as f:
            f.seek(self._offsets[name])
            if f.readinto(x.reshape(-1).view(np.uint8)) != x.nbytes:
                raise UserError(f"{path} ended inside tensor '{name}'; it changed while being "
                                "read, replace it and try again.")
        return x

