"""The CPU's row of the compile report (`sparseinfer compile-report --cpu`): the `generate`
programs compiled for this CPU, and the weight-sized XLA ops of their decode loops.

XLA's CPU backend widens a bf16 weight to float32 wherever an op it runs cannot read bf16 (a
one-row dot, a gather), and hoists loop-invariant converts out of the decode loop, where the
copy then lives for the whole generate (design.md, "bf16 on the CPU"). Each program is compiled
as `generate` runs it on the CPU (backend "auto": the XLA chunk loop), on abstract arguments (no
weight is allocated), and `loop_ops` lists what its decode loop copies: any such op fails the
report. XLA's cost analysis gives the bytes a program accesses (`bytes_accessed`), for scale.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

from sparseinfer_jax.bench.compile_cases import Case, program_cases
from sparseinfer_jax.bench.loop_ops import failures as loop_ops_failures
from sparseinfer_jax.bench.loop_ops import loop_ops, thresholds
from sparseinfer_jax.bench.shapes import shape_config
from sparseinfer_jax.errors import UserError
from sparseinfer_jax.model.dtypes import DTYPES


def compile_case(case: Case, loop: dict[str, int]) -> dict:
    """Compiles one program for the CPU; the record's fields (`loop`: `loop_ops.thresholds`)."""
    rec: dict[str, Any] = dict(name=case.name, kind=case.kind, compiled=False, error=None,
                               loop_ops=None, bytes_accessed=None)
    try:
        compiled = jax.jit(case.fn).trace(*case.args).lower().compile()
    except Exception as e:  # noqa: BLE001 - any compiler error is the report's finding
        rec["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300]}"
        return rec
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost  # a list of one on older jax
    rec.update(compiled=True, loop_ops=loop_ops(compiled, loop),
               bytes_accessed=int(cost["bytes accessed"]))
    return rec


def run(shape: str, batches: list[int], *, layers: int | None = None, dtype: str = "bfloat16",
        log: Callable[[str], None] = print) -> list[dict]:
    """Compiles the `generate` programs for the CPU at every batch; returns the records."""
    if not batches or min(batches) < 1:
        raise UserError(f"--batches must be positive integers, got {batches}.")
    cfg = shape_config(shape, layers)
    loop = thresholds(cfg, DTYPES[dtype])
    device_kind = jax.devices("cpu")[0].device_kind
    records = []
    for batch in batches:
        for case in program_cases(cfg, batch, DTYPES[dtype], jax.ShapeDtypeStruct):
            rec = dict(cpu="cpu", device_kind=device_kind, shape=shape,
                       layers=cfg.num_hidden_layers, dtype=dtype, batch=batch,
                       **compile_case(case, loop))
            records.append(rec)
            log(format_row(rec))
    return records


def failures(records: list[dict]) -> list[str]:
    """What fails the CPU's row: a compile error, or a decode loop that copies a weight or widens
    its rows."""
    out = [f"cpu {r['name']} batch {r['batch']}: {r['error']}" for r in records if r["error"]]
    return out + loop_ops_failures(records, "cpu")


HEADER = f"{'cpu':<5}{'batch':>5}  {'name':<16}{'ok':>3}{'loop ops':>9}  {'GB accessed':>11}"


def format_row(r: dict) -> str:
    """One table row (the header is `HEADER`)."""
    if not r["compiled"]:
        return f"{'cpu':<5}{r['batch']:>5}  {r['name']:<16}  no  {r['error']}"
    return (f"{'cpu':<5}{r['batch']:>5}  {r['name']:<16}{'yes':>3}{len(r['loop_ops']):>9}  "
            f"{r['bytes_accessed'] / 1e9:>11.2f}")
