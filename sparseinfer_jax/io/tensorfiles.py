"""Safetensors folders, one tensor at a time: the reader of HF checkpoints and of ours, our writer.

Headers are checked with the safetensors library: `safe_open` validates the JSON header and that
the file covers every tensor's bytes, so a truncated or corrupt file fails before any work. The
data is then read with plain `readinto` at the header's offsets rather than `get_tensor`:
`safe_open` maps the whole file, and every page read through the mapping stays in the process's
RSS until the file is closed (a 10 GB shard shows up as 10 GB of RSS), while `read` goes through
the page cache without being charged to the process. The header's dtypes map to numpy (bfloat16
through ml_dtypes, as safetensors' own numpy framework does), so torch is never needed.

The writer streams too: a file's header is computed from the shapes up front, then each tensor's
bytes are written once with plain `write`, so a full disk is an OSError (ENOSPC) and never the
SIGBUS a memory-mapped write would get.
"""

from __future__ import annotations

import json
import os
from typing import BinaryIO

import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open

from sparseinfer_jax.errors import UserError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# safetensors stores little-endian data.
DTYPES = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype(ml_dtypes.bfloat16),
          "U32": np.dtype("<u4")}
CODES = {dtype: code for code, dtype in DTYPES.items()}
FLOAT_CODES = ("F32", "F16", "BF16")
HF_REMEDY = "download it again"


def tensor_name(path: tuple) -> str:
    """A params path as a checkpoint tensor name: `("layers", 3, "mlp", "gate")` ->
    `layers.3.mlp.gate`."""
    return ".".join(str(k) for k in path)


def tensor_path(name: str) -> tuple:
    """The inverse of `tensor_name`."""
    return tuple(int(k) if k.isdigit() else k for k in name.split("."))


def _check_file(path: str, remedy: str) -> dict[str, tuple[tuple[int, ...], str]]:
    """Validates a safetensors file with the library; returns {name: (shape, dtype code)}."""
    try:
        with safe_open(path, framework="numpy") as f:
            return {n: (tuple(f.get_slice(n).get_shape()), f.get_slice(n).get_dtype())
                    for n in f.keys()}
    except (SafetensorError, OSError) as e:
        raise UserError(f"{path} is not a readable safetensors file ({e}); {remedy}.") from None


def _data_offsets(path: str) -> dict[str, int]:
    """{name: absolute byte offset of its data} from the header `_check_file` validated."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    return {n: 8 + size + t["data_offsets"][0] for n, t in header.items() if n != "__metadata__"}


class SafetensorsFolder:
    """The tensors of `model.safetensors` or of the shards listed in `model.safetensors.index.json`.

    Opening reads every header (not the data) and records each tensor's file, shape and dtype.
    `remedy` ends every error message (what the user should do about a damaged file).
    """

    def __init__(self, folder: str, *, remedy: str = HF_REMEDY, codes=FLOAT_CODES):
        self.folder = folder
        self.files: dict[str, str] = {}  # tensor name -> file path
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, np.dtype] = {}
        self._offsets: dict[str, int] = {}
        index = os.path.join(folder, INDEX_FILE)
        if os.path.isfile(index):
            weight_map = self._read_index(index, remedy)
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
                                f"{remedy}.")
            tensors = _check_file(path, remedy)
            offsets = _data_offsets(path)
            for name, (shape, code) in tensors.items():
                if weight_map is not None and weight_map.get(name) != file:
                    continue  # the index decides which file holds a tensor
                if code not in codes:
                    raise UserError(f"tensor '{name}' in {path} has dtype {code}; only float "
                                    "checkpoints are supported.")
                self.files[name] = path
                self.shapes[name] = shape
                self.dtypes[name] = DTYPES[code]
                self._offsets[name] = offsets[name]
        for name, file in (weight_map or {}).items():
            if name not in self.files:
                raise UserError(f"{INDEX_FILE} lists tensor '{name}' in {file} but that file does "
                                f"not contain it; {remedy}.")

    @staticmethod
    def _read_index(path: str, remedy: str) -> dict[str, str]:
        try:
            with open(path) as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
            weight_map = None
        if not isinstance(weight_map, dict) or not all(
                isinstance(v, str) for v in weight_map.values()):
            raise UserError(f"{path} is not a valid safetensors index (its 'weight_map' must map "
                            f"tensor names to file names); {remedy}.")
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


def _header(specs: dict[str, tuple[tuple[int, ...], np.dtype]]) -> bytes:
    header, offset = {}, 0
    for name, (shape, dtype) in specs.items():
        size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        header[name] = {"dtype": CODES[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format aligns the data to 8 bytes
    return len(raw).to_bytes(8, "little") + raw


def file_size(specs: dict[str, tuple[tuple[int, ...], np.dtype]]) -> int:
    """Bytes of a safetensors file holding tensors of these `{name: (shape, dtype)}`."""
    data = sum(int(np.prod(s, dtype=np.int64)) * d.itemsize for s, d in specs.values())
    return len(_header(specs)) + data


class Writer:
    """Writes one safetensors file, header first, then each tensor in the order of `specs`.

    A context manager: the file is closed on leaving, and must then be complete unless an
    exception is on its way out.
    """

    def __init__(self, path: str, specs: dict[str, tuple[tuple[int, ...], np.dtype]]):
        self.path, self._specs, self._pending = path, specs, list(specs)
        self._file: BinaryIO = open(path, "xb")  # closed by __exit__
        self._file.write(_header(specs))

    def write(self, name: str, x: np.ndarray) -> None:
        """Appends tensor `name` (the next one of `specs`, of its shape and dtype)."""
        assert self._pending and self._pending[0] == name, (name, self._pending[:1])
        assert (x.shape, x.dtype) == self._specs[name], (name, x.shape, x.dtype)
        self._pending.pop(0)
        self._file.write(memoryview(np.ascontiguousarray(x).reshape(-1).view(np.uint8)))

    def __enter__(self) -> Writer:
        return self

    def __exit__(self, kind, value, traceback) -> None:
        self._file.close()
        assert kind is not None or not self._pending, self._pending[:1]
