"""Checks, on a machine without a GPU, that Pallas kernels lower to valid Triton IR.

`jax.jit(...).trace(...).lower(lowering_platforms=("cuda",))` runs the Pallas Triton lowering
(every primitive through `jax/_src/pallas/triton/lowering.py`, block shapes, power-of-2 sizes)
and embeds the Triton module as bytecode in the custom call; this parses it back and runs the MLIR
verifier. What it cannot check is Triton's own compilation to PTX, which happens on a GPU.
It reads the custom call's backend config as jaxlib <= 0.10.2 writes it (private JAX modules).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import jax
from jax._src.lib.mlir import ir
from jax._src.pallas.triton import lowering as triton_lowering

TRITON_CALL_TARGET = "__gpu$xla.gpu.triton"


def _walk(op) -> Iterator:
    for region in op.regions:
        for block in region.blocks:
            for child in block.operations:
                yield child.operation
                yield from _walk(child.operation)


def triton_modules(fn: Callable, *args) -> list[str]:
    """Cross-lowers `fn(*args)` for CUDA and returns the verified Triton module of each kernel."""
    lowered = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))
    modules = []
    for op in _walk(lowered.compiler_ir("stablehlo").operation):
        if op.name != "stablehlo.custom_call":
            continue
        if ir.StringAttr(op.attributes["call_target_name"]).value != TRITON_CALL_TARGET:
            continue
        config = ir.DictAttr(op.attributes["mhlo.backend_config"])
        bytecode = ir.StringAttr(config["ir"]).value_bytes
        with triton_lowering._new_ir_context():
            module = ir.Module.parse(bytecode)
            assert module.operation.verify(), "Triton module failed verification"
            modules.append(str(module))
    return modules
