"""Summarises what `benchmarks/gpu_check.sh` wrote: every figure beside the read roofline, and
issue 20's targets, each met or MISSED.

Reads, from one folder, `layer.json` (`benchmarks/gpu_variants.py`: the roofline, one layer's
MLP cases), `bench_*.json` (`sparseinfer bench`: decode steps) and `compile_report.json`; a file
cut short by a time limit is summarised as far as it goes, and a missing one is said missing.

    python benchmarks/gpu_summary.py gpu_out
"""

from __future__ import annotations

import json
import pathlib
import sys

# Issue 20's targets: one 7b layer's sparse MLP at 10 % active over the dense MLP's time; the 7b
# decode step at full depth, sparse at 10 % over dense tokens/s, and at 100 % over dense time.
MLP_AT_10_MAX = 0.2
SPEEDUP_AT_10_MIN = 2.0
FULL_SLOWDOWN_MAX = 1.1
# The issue asks for the 7b shape (at full depth); other runs are reported, not judged.
FULL_DEPTH = 32
LAYER_7B = (4096, 11008)


def verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def layer_lines(path: pathlib.Path) -> tuple[list[str], float | None]:
    """The layer cases beside the roofline, the layer target; and the roofline in GB/s."""
    v = json.loads(path.read_text())
    roof = v["roofline_gb_s"]
    lines = [f"{path.name}: read roofline {roof:.0f} GB/s (float32 sum over "
             f"{v['roofline_bytes'] / (1 << 30):g} GiB), {v['device']}, jax {v['jax']}; one "
             f"layer D={v['d']} F={v['f']} B={v['batch']}, {v['layers']} cold layers a call"]
    for r in v["records"]:
        if "error" in r:
            lines.append(f"  {r['name']:<58} FAILED {r['error']}")
            continue
        of_dense = f"  {r['of_dense']:.3f} of dense" if "of_dense" in r else ""
        lines.append(f"  {r['name']:<58} {r['us']:8.2f} us {r['gb_s']:7.0f} GB/s "
                     f"{r['of_roofline']:5.2f} of roofline{of_dense}")
    at10 = next((r for r in v["records"] if r["name"] == "sparse op sign 10%" and "us" in r), None)
    if (v["d"], v["f"]) != LAYER_7B:
        lines.append(f"  target not judged: it is for a 7b layer (D, F = {LAYER_7B})")
    elif at10 is not None and "of_dense" in at10:
        x = at10["of_dense"]
        lines.append(f"  target: one layer's sparse MLP at 10 % <= {MLP_AT_10_MAX} of dense time: "
                     f"{x:.3f} {verdict(x <= MLP_AT_10_MAX)}")
    return lines, roof


def speedup_over(r: dict, dense: dict | None) -> float:
    """Dense ms / this record's ms: the paired median when the record timed dense alongside
    itself (`bench.decode_record`), else the ratio of the two records' medians."""
    if r.get("speedup"):
        return r["speedup"]["median"]
    return dense["decode_ms_median"] / r["decode_ms_median"] if dense else float("nan")


def bench_lines(path: pathlib.Path, roof: float | None) -> list[str]:
    """A bench file's decode rows (each step's GB/s over the roofline) and the decode targets."""
    recs = json.loads(path.read_text())
    copy = next((r for r in recs if r["kind"] == "copy"), None)
    if copy is None:
        return [f"{path.name}: no records"]
    first = recs[-1]
    lines = [f"{path.name}: {first.get('shape')} x {first.get('layers')} layers, "
             f"{first.get('dtype')}, {first.get('tokens')} tokens; copy "
             f"{copy['achieved_gb_s']:.0f} GB/s, matvec read {copy['read_gb_s']:.0f} GB/s, "
             f"{copy.get('device')}"]
    decode = [r for r in recs if r["kind"] in ("decode", "batch")]
    dense = next((r for r in decode if r["kind"] == "decode" and r["mode"] == "dense"), None)
    for r in decode:
        of_roof = f" = {r['achieved_gb_s'] / roof:.2f} of roofline" if roof else ""
        lines.append(f"  {r['kind']:<6} {r['mode']:<6} {r['backend'][:8]:<8} B={r.get('batch', 1)}"
                     f" active {r['active_fraction']:.3f}: {r['decode_ms_median']:8.3f} ms/token "
                     f"{speedup_over(r, dense):5.2f}x dense tok/s  {r['achieved_gb_s']:6.0f} GB/s"
                     + of_roof)
    sparse = [r for r in decode if r["kind"] == "decode" and r["mode"] == "sparse"]
    judged = first.get("shape") == "7b" and first.get("layers") == FULL_DEPTH
    for r in sparse:
        if dense is None or not judged:
            continue
        if r.get("requested_fraction") == 0.1:
            x = speedup_over(r, dense)
            lines.append(f"  target {r['backend']}: 10 % active >= {SPEEDUP_AT_10_MIN}x dense "
                         f"tokens/s: {x:.2f}x (computed {r['active_fraction']:.3f}) "
                         f"{verdict(x >= SPEEDUP_AT_10_MIN)}")
        if r.get("requested_fraction") == 1.0:
            slow = 1 / speedup_over(r, dense)
            lines.append(f"  target {r['backend']}: 100 % active <= {FULL_SLOWDOWN_MAX}x dense "
                         f"time: {slow:.2f}x {verdict(slow <= FULL_SLOWDOWN_MAX)}")
    if sparse and not judged:
        lines.append(f"  targets not judged: they are for 7b x {FULL_DEPTH} layers")
    return lines


def compile_lines(path: pathlib.Path) -> list[str]:
    """The compile report: per kernel registers, spills, live programs; per program launches."""
    recs = json.loads(path.read_text())
    lines = [f"{path.name}: {len(recs)} records, "
             f"{sum(not r['compiled'] for r in recs)} failed to compile"]
    for r in recs:
        if not r["compiled"]:
            lines.append(f"  {r['gpu']} B={r['batch']} {r['name']}: FAILED {r['error']}")
        elif r["kind"] == "kernel":
            lines.append(f"  {r['gpu']} B={r['batch']} {r['name']:<23} {r['registers']:>3} regs "
                         f"{r['spill_bytes']} spill, grid {r['grid']}, "
                         f"{r.get('live_per_sm_10')} live/SM at 10 %")
        else:
            lines.append(f"  {r['gpu']} B={r['batch']} {r['name']:<23} {r['kernels']} launches, "
                         f"decode step {r.get('decode_launches')}, "
                         f"{r.get('launches_per_layer')} a layer, Pallas {r['pallas_kernels']}")
    return lines


def main(folder: str) -> None:
    out = pathlib.Path(folder)
    roof = None
    names = ["layer.json", *(p.name for p in sorted(out.glob("bench_*.json"))),
             "compile_report.json"]
    for name in names:
        path = out / name
        if not path.exists():
            print(f"{name}: missing")
            continue
        try:
            if name == "layer.json":
                lines, roof = layer_lines(path)
            elif name.startswith("bench_"):
                lines = bench_lines(path, roof)
            else:
                lines = compile_lines(path)
        except (ValueError, KeyError) as e:  # a file cut mid-write by a time limit
            lines = [f"{name}: unreadable ({type(e).__name__}: {e})"]
        print("\n".join(lines))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "gpu_out")
