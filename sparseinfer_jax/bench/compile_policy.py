"""The GPU compile report's pass/fail policy: what a Pallas kernel must not do."""

from __future__ import annotations

from sparseinfer_jax.bench import loop_ops

MAX_REGISTERS = 128
# Spill bytes per thread a kernel may have. ptxas (at its default level, as XLA runs it) caps
# registers at an occupancy step and spills a few bytes to reach it: 8-16 bytes at 32-56 registers
# for some batch sizes with jax 0.12's Triton (none with 0.10.2), moving as ptxas changes, and
# kept in L1. Tiles too big for the registers spill more.
MAX_SPILL_BYTES = 32
MIN_LIVE_PER_SM = 4
# A sparse decode step may launch at most this many more kernels a layer than the dense one.
MAX_EXTRA_LAUNCHES = 2
# The shapes the live-programs target applies to (a tiny layer cannot fill a GPU).
TARGET_SHAPES = ("7b", "13b")


def failures(records: list[dict]) -> list[str]:
    """What makes the report fail, per Pallas kernel: a compile error, more than MAX_SPILL_BYTES
    spilled, more than
    MAX_REGISTERS registers, or (at the shapes of real models, `TARGET_SHAPES`) fewer than
    MIN_LIVE_PER_SM programs with work per SM at 10% active; per `generate` program, a sparse
    decode step launching more than MAX_EXTRA_LAUNCHES kernels a layer beyond the dense one's, and
    any program whose decode loop copies a weight or widens its rows (`loop_ops`). XLA's own
    fusions' registers and spills are XLA's choice: listed in a program's `xla_spills`, not a
    failure."""
    out = []
    for r in records:
        what = f"{r['gpu']} {r['name']} batch {r['batch']}: "
        if not r["compiled"]:
            out.append(what + str(r["error"]))
            continue
        if (r["spill_bytes"] or 0) > MAX_SPILL_BYTES:
            out.append(what + f"{r['spill_bytes']} spill bytes (at most {MAX_SPILL_BYTES})")
        if r["kind"] == "kernel" and (r["registers"] or 0) > MAX_REGISTERS:
            out.append(what + f"{r['registers']} registers (at most {MAX_REGISTERS})")
        live = r.get("live_per_sm_10")
        if r["shape"] in TARGET_SHAPES and live is not None and live < MIN_LIVE_PER_SM:
            out.append(what + f"{live} live programs per SM at 10% active "
                       f"(at least {MIN_LIVE_PER_SM})")
    out += loop_ops.failures(records, "gpu")
    per_layer = {(r["gpu"], r["batch"], r["name"]): r.get("launches_per_layer") for r in records}
    for (gpu, batch, name), sparse in per_layer.items():
        dense = per_layer.get((gpu, batch, "generate_dense"))
        if name == "generate_sparse" and None not in (sparse, dense) and (
                sparse > dense + MAX_EXTRA_LAUNCHES):
            out.append(f"{gpu} generate_sparse batch {batch}: the decode step launches {sparse:g} "
                       f"a layer, dense {dense:g} (at most dense + {MAX_EXTRA_LAUNCHES})")
    return out
