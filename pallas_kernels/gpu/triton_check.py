"""Checks, on a machine without a GPU, that Pallas kernels lower to valid Triton IR.

`jax.jit(...).trace(...).lower(lowering_platforms=("cuda",))` runs the Pallas Triton lowering
(every primitive through `jax/_src/pallas/triton/lowering.py`, block shapes, power-of-2 sizes)
and embeds the Triton module as bytecode in the custom call; this parses it back and runs the MLIR
verifier. What it cannot check is Triton's own compilation to PTX: `sparseinfer compile-report`
does that (with the CUDA plugin). jax >= 0.11 lowers Pallas for a GPU only for an abstract GPU
device (`backend.abstract_gpu_mesh`). It reads the custom call's backend config as jaxlib 0.10
to 0.12 write it (private JAX modules, looked up by `backend.private_module`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import jax

from pallas_kernels import backend as bk

# The custom call a Pallas Triton kernel lowers to (what `compile_report` counts in a program).
TRITON_CALL_TARGET = "__gpu$xla.gpu.triton"
DEVICE_KIND = "NVIDIA H100 80GB HBM3"
COMPUTE_CAPABILITY = (9, 0)  # DEVICE_KIND's


def _walk(op) -> Iterator:
    for region in op.regions:
        for block in region.blocks:
            for child in block.operations:
                yield child.operation
                yield from _walk(child.operation)


def triton_modules(fn: Callable, *args, device_kind: str = DEVICE_KIND,
                   compute_capability: tuple[int, int] = COMPUTE_CAPABILITY) -> list[str]:
    """Cross-lowers `fn(*args)` for a CUDA GPU of `device_kind` and returns the verified Triton
    module of each kernel."""
    # Looked up here: a jax without Pallas' Triton backend can still import this module.
    triton_lowering = bk.private_module(bk.TRITON_LOWERING)
    ir = bk.private_module(bk.MLIR).ir

    with bk.targeting_gpu(bk.abstract_gpu_mesh(device_kind),
                          compute_capability=compute_capability, device_kind=device_kind):
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
