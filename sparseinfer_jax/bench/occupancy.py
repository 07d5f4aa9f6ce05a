"""Occupancy arithmetic of the GPU compile report: how many programs one SM holds, and how many
have work at a given share of active neurons, per SM."""

from __future__ import annotations

import math
from collections.abc import Callable

from sparseinfer_jax.bench.gpu_spec import GpuSpec

ACTIVE_FRACTIONS = (0.05, 0.1, 0.2)


def resident_programs(spec: GpuSpec, threads: int, registers: int, shared: int) -> int:
    """Programs (thread blocks) one SM holds at once: registers are allocated per warp in units
    of 256, at most 32 blocks per SM."""
    warps = -(-threads // 32)
    per_warp = -(-max(registers, 1) * 32 // 256) * 256
    limits = [32, spec.threads_per_sm // threads, spec.registers_per_sm // (warps * per_warp)]
    if shared:
        limits.append(spec.shared_per_sm // shared)
    return min(limits)


def live_per_sm(live: Callable[[int], int], spec: GpuSpec, neurons: int) -> dict[str, float]:
    """`live_per_sm_P`: programs with work per SM when P% of the `neurons` are active, for each
    of ACTIVE_FRACTIONS (`live(count)` gives a kernel's programs with work at `count`)."""
    return {f"live_per_sm_{round(frac * 100)}": round(live(math.ceil(frac * neurons)) / spec.sms, 2)
            for frac in ACTIVE_FRACTIONS}
