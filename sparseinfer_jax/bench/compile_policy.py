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
# A sparse decode step on the Pallas kernels may launch at most this many more kernels a layer
# than the dense one (the two kernels replace the dense MLP's few).
MAX_EXTRA_LAUNCHES = 2
# Why the portable path (a GPU Pallas Triton cannot serve: the T4) is not held to that: it has no
# kernel of its own. XLA runs the vote as a few fusions, each compaction as a cumsum in passes, a
# compare and a scatter, and each stage as a conditional (the bucket) around a gather-and-product:
# on the T4 spec at the 7b shape the layer op's longest path is 35 launches where the dense MLP's
# is about 5 (docs/design.md, "The sparse path on each backend").
PORTABLE_WHY = ("the portable path has no kernels of its own: XLA's vote fusions, a cumsum-and-"
                "scatter compaction per stage and a conditional per stage")
# The shapes the live-programs target applies to (a tiny layer cannot fill a GPU).
TARGET_SHAPES = ("7b", "13b")


def failures(records: list[dict]) -> list[str]:
    """What makes the report fail, per Pallas kernel: a compile error, more than MAX_SPILL_BYTES
    spilled, more than
    MAX_REGISTERS registers, or (at the shapes of real models, `TARGET_SHAPES`) fewer than
    MIN_LIVE_PER_SM programs with work per SM at 10% active; per `generate` program, a sparse
    decode step on the Pallas kernels launching more than MAX_EXTRA_LAUNCHES kernels a layer
    beyond the dense one's (`notes` says the portable path's), and
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
    for r, sparse, dense in _launches(records):
        if r["path"] == "pallas" and sparse > dense + MAX_EXTRA_LAUNCHES:
            out.append(f"{r['gpu']} generate_sparse batch {r['batch']}: the decode step launches "
                       f"{sparse:g} a layer, dense {dense:g} (at most dense + "
                       f"{MAX_EXTRA_LAUNCHES})")
    return out


def _launches(records: list[dict]):
    """(sparse record, its launches a layer, dense's) per GPU and batch where both are known."""
    per_layer = {(r["gpu"], r["batch"], r["name"]): r.get("launches_per_layer") for r in records}
    for r in records:
        if r["name"] != "generate_sparse":
            continue
        sparse = r.get("launches_per_layer")
        dense = per_layer.get((r["gpu"], r["batch"], "generate_dense"))
        if None not in (sparse, dense):
            yield r, sparse, dense


def notes(records: list[dict]) -> list[str]:
    """What the report says without failing: the launches of a sparse step on the portable
    path, which the launch limit does not hold (`PORTABLE_WHY`)."""
    return [f"{r['gpu']} generate_sparse batch {r['batch']}: the portable path launches "
            f"{sparse:g} a layer, dense {dense:g}; dense + {MAX_EXTRA_LAUNCHES} holds for the "
            f"Pallas kernels only: {PORTABLE_WHY}"
            for r, sparse, dense in _launches(records) if r["path"] == "portable"]
