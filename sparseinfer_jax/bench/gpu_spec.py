"""GPU specs for compiling without a GPU: the shipped spec files (XLA's, and the T4's and L4's made
in XLA's format from their published figures), or a user's, and the figures read from them."""

from __future__ import annotations

import dataclasses
import functools
import os
import re

from sparseinfer_jax.errors import UserError

SPECS_DIR = os.path.join(os.path.dirname(__file__), "gpu_specs")


GPUS = tuple(sorted(os.path.splitext(f)[0] for f in os.listdir(SPECS_DIR) if f.endswith(".txtpb")))


DEFAULT_GPUS = ("h100", "a100")


@dataclasses.dataclass(frozen=True)
class GpuSpec:
    """The fields of a GPU spec the occupancy arithmetic needs."""

    name: str
    device_kind: str
    text: str
    compute_capability: tuple[int, int]
    sms: int
    registers_per_sm: int
    threads_per_sm: int
    shared_per_sm: int


def _field(text: str, key: str, path: str) -> str:
    m = re.search(rf"^\s*{key}: \"?([^\"\n]*)\"?$", text, re.M)
    if not m:
        raise UserError(f"GPU spec {path} has no {key}: start from a file in {SPECS_DIR}.")
    return m.group(1)


def _count(text: str, key: str, path: str) -> int:
    value = _field(text, key, path)
    if not value.isdigit():
        raise UserError(f"GPU spec {path} field {key} must be a whole number, got '{value}'.")
    return int(value)


def gpu_spec(name: str) -> GpuSpec:
    """Reads a GPU spec: a shipped one by name (`gpu_specs/<name>.txtpb`) or a spec file by path,
    named after the file (UserError for neither, or a file without the fields used here)."""
    path = os.path.join(SPECS_DIR, name + ".txtpb") if name in GPUS else name
    if not os.path.isfile(path):
        missing = "is a folder" if os.path.isdir(path) else "was not found"
        if os.sep not in name and not name.endswith(".txtpb"):
            missing = "is not a GPU this report knows"
        raise UserError(f"--gpu {name} {missing}; give a comma list of {', '.join(GPUS)} or GPU "
                        "spec files (.txtpb).")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError:
        raise UserError(f"GPU spec {path} is not text (a .txtpb file): start from a file in "
                        f"{SPECS_DIR}.") from None
    except OSError as e:
        raise UserError(f"cannot read GPU spec {path} ({e.strerror}); make it readable.") from None
    cc = re.search(r"cuda_compute_capability \{\s*major: (\d+)(?:\s*minor: (\d+))?", text)
    if not cc:
        raise UserError(f"GPU spec {path} has no cuda_compute_capability: start from a file in "
                        f"{SPECS_DIR}.")
    field = functools.partial(_field, text, path=path)
    count = functools.partial(_count, text, path=path)
    return GpuSpec(
        name=os.path.splitext(os.path.basename(path))[0],
        device_kind=field("device_description_str"),
        text=text,
        compute_capability=(int(cc.group(1)), int(cc.group(2) or 0)),
        sms=count("core_count"),
        registers_per_sm=count("registers_per_core_limit"),
        threads_per_sm=count("threads_per_core_limit"),
        shared_per_sm=count("shared_memory_per_core"),
    )


# Below this compute capability a GPU has no bfloat16 arithmetic (a T4 is sm_75): XLA widens bf16
# weights to float32 there, and a model runs in float16 (`model.memory.NO_BF16`).
BF16_MIN_CC = (8, 0)


def run_dtype(spec: GpuSpec, dtype: str) -> str:
    """The dtype a model of `dtype` runs in on `spec`'s GPU: float16 for bfloat16 below
    `BF16_MIN_CC`, else `dtype`."""
    return "float16" if dtype == "bfloat16" and spec.compute_capability < BF16_MIN_CC else dtype
