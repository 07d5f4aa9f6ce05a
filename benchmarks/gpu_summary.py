"""Summarises `sparseinfer bench` JSON files: every figure as a fraction of copy bandwidth.

Reads `compile_report.json` (the offline compile report), `copy.json` and `bench_*.json` in a
folder (what `benchmarks/gpu_check.sh` writes; a file
cut short by a time limit is summarised as far as it goes) and prints, per file: the copy and
matvec read bandwidths, each decode row (ms/token, x dense, GB/s, fraction of copy), each kernel
row (ms, x the dense op, fraction of copy), and the issue's targets as met or missed.

    python benchmarks/gpu_summary.py gpu_out
"""

from __future__ import annotations

import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from sparseinfer_jax.bench.report import KERNEL_BASE

# The issue's targets: sparse at 10 % active vs dense (GPU, 7b), predictor vs dense gate matvec,
# sparse at 100 % vs dense, sparse MLP kernel's share of copy bandwidth.
SPEEDUP_AT_10 = 2.0
PREDICTOR_MAX = 0.10
FULL_SLOWDOWN_MAX = 1.15
MLP_COPY_MIN = 0.60


def verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def summarise(path: pathlib.Path) -> list[str]:
    """The summary lines of one bench JSON file."""
    recs = json.loads(path.read_text())
    copy = next((r for r in recs if r["kind"] == "copy"), None)
    if copy is None:
        return [f"{path.name}: no records"]
    first = recs[-1]
    lines = [f"{path.name}: {first.get('shape')} x {first.get('layers')} layers, "
             f"{first.get('dtype')}, {first.get('tokens')} tokens; copy "
             f"{copy['achieved_gb_s']:.0f} GB/s, matvec read {copy['read_gb_s']:.0f} GB/s "
             f"({copy['read_gb_s'] / copy['achieved_gb_s']:.2f} of copy), {copy.get('device')}"]
    decode = [r for r in recs if r["kind"] in ("decode", "batch")]
    dense = next((r for r in decode if r["kind"] == "decode" and r["mode"] == "dense"), None)
    for r in decode:
        vs = f"{speedup_over(r, dense):5.2f}x dense tok/s"
        lines.append(f"  {r['kind']:<6} {r['mode']:<8} {r['backend'][:8]:<8} B={r.get('batch', 1)}"
                     f" active {r['active_fraction']:.3f}: {r['decode_ms_median']:8.3f} ms/token "
                     f"{vs}  {r['achieved_gb_s']:7.1f} GB/s = {r['fraction_of_copy']:.2f} of copy")
    base: dict[str, dict] = {}
    for r in (r for r in recs if r["kind"] == "kernel"):
        if r["mode"] == "dense":
            base[r["op"]] = r
        ref = base.get(KERNEL_BASE.get(r["op"], r["op"]))
        ratio = r["ms"]["median"] / ref["ms"]["median"] if ref else float("nan")
        lines.append(f"  kernel {r['op']:<11} {r['mode']:<6} {r['backend'][:8]:<8} "
                     f"active {r['active_fraction']:.3f}: {r['ms']['median']:8.4f} ms "
                     f"({ratio:.3f} x dense op) {r['achieved_gb_s']:7.1f} GB/s = "
                     f"{r['fraction_of_copy']:.2f} of copy")
    lines += targets(recs, dense)
    return lines


def speedup_over(r: dict, dense: dict | None) -> float:
    """Dense ms / this record's ms: the paired median when the record timed dense alongside
    itself (`bench.decode_record`), else the ratio of the two records' medians."""
    if r.get("speedup"):
        return r["speedup"]["median"]
    return dense["decode_ms_median"] / r["decode_ms_median"] if dense else float("nan")


def targets(recs: list[dict], dense: dict | None) -> list[str]:
    """The issue's targets that these records can judge."""
    out = []
    sparse = [r for r in recs if r["kind"] == "decode" and r["mode"] == "sparse"]
    for backend in sorted({r["backend"] for r in sparse}):
        rows = [r for r in sparse if r["backend"] == backend]
        at10 = [r for r in rows if r.get("requested_fraction") == 0.1]
        at100 = [r for r in rows if r.get("requested_fraction") == 1.0]
        if dense and at10:
            x = speedup_over(at10[0], dense)
            out.append(f"  target {backend}: 10 % active >= {SPEEDUP_AT_10}x dense: {x:.2f}x "
                       f"(computed {at10[0]['active_fraction']:.3f}) {verdict(x >= SPEEDUP_AT_10)}")
        if dense and at100:
            slow = 1 / speedup_over(at100[0], dense)
            out.append(f"  target {backend}: 100 % active <= {FULL_SLOWDOWN_MAX}x dense time: "
                       f"{slow:.2f}x {verdict(slow <= FULL_SLOWDOWN_MAX)}")
    gate = None  # the dense gate matvec timed just before each predictor
    for r in (r for r in recs if r["kind"] == "kernel"):
        if r["op"] == "gate_matvec":
            gate = r
        if r["op"] == "predictor" and gate is not None:
            x = r["ms"]["median"] / gate["ms"]["median"]
            out.append(f"  target {r['backend']}: predictor <= {PREDICTOR_MAX} of gate matvec "
                       f"(active {r['active_fraction']:.2f}): {x:.3f} "
                       f"{verdict(x <= PREDICTOR_MAX)}")
        if r["op"] == "mlp" and r["mode"] == "sparse" and r["active_fraction"] == 0.1:
            f = r["fraction_of_copy"]
            out.append(f"  target {r['backend']}: sparse MLP at 10 % >= {MLP_COPY_MIN} of copy: "
                       f"{f:.2f} {verdict(f >= MLP_COPY_MIN)}")
    return out


def compile_summary(path: pathlib.Path) -> list[str]:
    """The offline compile report's lines: per kernel and batch, registers, spills, live/SM."""
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
    return lines


def main(folder: str) -> None:
    out = pathlib.Path(folder)
    report = out / "compile_report.json"
    if report.exists():
        try:
            print("\n".join(compile_summary(report)))
        except (ValueError, KeyError) as e:
            print(f"{report.name}: unreadable ({type(e).__name__}: {e})")
    copy = out / "copy.json"
    if copy.exists():
        c = json.loads(copy.read_text())
        print(f"copy.json: copy {c['copy_gb_s']:.0f} GB/s, matvec read {c['read_gb_s']:.0f} GB/s "
              f"({c['read_gb_s'] / c['copy_gb_s']:.2f} of copy) over {c['bytes'] >> 20} MiB, "
              f"{c['device']}, jax {c['jax']}")
    for path in sorted(out.glob("bench_*.json")):
        try:
            print("\n".join(summarise(path)))
        except (ValueError, KeyError) as e:  # a file cut mid-write by a time limit
            print(f"{path.name}: unreadable ({type(e).__name__}: {e})")
    variants = out / "variants.json"
    if variants.exists():
        v = json.loads(variants.read_text())
        print(f"variants.json: one layer D={v['d']} F={v['f']} B={v['batch']}, "
              f"{v['active']} active, {v['device']}")
        for r in v["records"]:
            figure = (f"{r['us']:9.2f} us" + (f" {r['gb_s']:8.1f} GB/s" if r.get("gb_s") else "")
                      if "us" in r else f"FAILED {r['error']}")
            print(f"  {r['name']:<50} {figure}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "gpu_out")
