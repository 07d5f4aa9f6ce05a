"""GPU specs for compiling without a GPU: the shipped XLA spec files and figures read from them."""

from __future__ import annotations

import dataclasses
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


def _field(text: str, key: str) -> str:
    m = re.search(rf"^\s*{key}: \"?([^\"\n]*)\"?$", text, re.M)
    assert m, f"GPU spec has no {key}"
    return m.group(1)


def gpu_spec(name: str) -> GpuSpec:
    """Reads `gpu_specs/<name>.txtpb` (UserError for an unknown name)."""
    if name not in GPUS:
        raise UserError(f"--gpu must be a comma list of {', '.join(GPUS)}, got '{name}'.")
    with open(os.path.join(SPECS_DIR, name + ".txtpb")) as f:
        text = f.read()
    cc = re.search(r"cuda_compute_capability \{\s*major: (\d+)(?:\s*minor: (\d+))?", text)
    return GpuSpec(
        name=name,
        device_kind=_field(text, "device_description_str"),
        text=text,
        compute_capability=(int(cc.group(1)), int(cc.group(2) or 0)),
        sms=int(_field(text, "core_count")),
        registers_per_sm=int(_field(text, "registers_per_core_limit")),
        threads_per_sm=int(_field(text, "threads_per_core_limit")),
        shared_per_sm=int(_field(text, "shared_memory_per_core")),
    )
