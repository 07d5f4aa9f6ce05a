"""Tables and plots of benchmark records.

Both tables compare with dense the same way: "speed-up" is dense time / this time, so higher is
better and 1.00x is dense's speed.
"""

from __future__ import annotations

from sparseinfer_jax.errors import UserError

HEADER = (f"{'kind':<7} {'mode':<9} {'backend':<8} {'B':>2} {'active':>6} {'ms/token':>9} "
          f"{'IQR':>13} {'tok/s':>7} {'GB/s':>6} {'of copy':>7} {'compile s':>9} "
          f"{'speed-up (IQR), paired':>22}")


def format_row(r: dict) -> str:
    """One table line of a decode or batch record."""
    ms = r["decode_ms"]
    compile_s = r.get("compile_s")
    return (f"{r['kind']:<7} {r['mode']:<9} {r['backend'][:8]:<8} {r.get('batch', 1):>2} "
            f"{r['active_fraction']:>6.3f} {ms['median']:>9.2f} "
            f"{ms['q1']:>6.2f}-{ms['q3']:<6.2f} {r['tokens_per_s']:>7.1f} "
            f"{r['achieved_gb_s']:>6.1f} {r['fraction_of_copy']:>7.2f} "
            + (f"{compile_s:>9.2f}" if compile_s else f"{'':>9}")
            + (_paired(r["speedup"]) if r.get("speedup") else ""))


def _paired(x: dict) -> str:
    return f" {x['median']:>9.2f}x ({x['q1']:.2f}-{x['q3']:.2f})"


# The dense op each sparse-only op is compared with in the kernel table.
KERNEL_BASE = {"predictor": "gate_matvec", "signmag": "gate_matvec", "sparse_mlp_layer": "mlp",
               "chain_mlp": "mlp"}


def format_kernels(records: list[dict]) -> str:
    """The kernel table: each op's median ms, speed-up (dense ms / its ms) and GB/s.

    Each sparse row is compared with the dense row timed just before it (`kernel_records` times
    the dense ops again for every fraction, so a ratio comes from one stretch of one run)."""
    rows = [r for r in records if r["kind"] == "kernel"]
    if not rows:
        return ""
    dense: dict[str, float] = {}
    lines = [f"{'op':<16} {'backend':<8} {'active':>6} {'ms':>8} {'speed-up':>8} {'GB/s':>6}"]
    for r in rows:
        if r["mode"] == "dense":
            dense[r["op"]] = r["ms"]["median"]
        base = dense[KERNEL_BASE.get(r["op"], r["op"])]
        lines.append(f"{r['op']:<16} {r['backend']:<8} {r['active_fraction']:>6.3f} "
                     f"{r['ms']['median']:>8.3f} {base / r['ms']['median']:>7.2f}x "
                     f"{r['achieved_gb_s']:>6.1f}")
    return "\n".join(lines)


MLP_PARTS = ("predictor", "gate", "up", "down")


def format_bytes(records: list[dict]) -> str:
    """MLP bytes per decode step, split into predictor, gate, up and down (MB, all layers), and
    their sum over the dense MLP's."""
    rows = [r for r in records if r["kind"] in ("decode", "batch")]
    dense = next((r for r in rows if r["mode"] == "dense"), None)
    if not rows:
        return ""
    lines = [f"{'mode':<9} {'backend':<8} {'B':>2} {'active':>6} {'fired':>6} "
             + " ".join(f"{p + ' MB':>12}" for p in MLP_PARTS) + f" {'of dense':>8}"]
    for r in rows:
        b = r["bytes_per_step"]
        mlp = sum(b[p] for p in MLP_PARTS)
        ratio = (f"{mlp / sum(dense['bytes_per_step'][p] for p in MLP_PARTS):>8.3f}" if dense
                 else f"{'-':>8}")  # no dense record (--modes sparse): nothing to divide by
        lines.append(f"{r['mode']:<9} {r['backend'][:8]:<8} {r.get('batch', 1):>2} "
                     f"{r['active_fraction']:>6.3f} {r.get('fired_fraction', 1.0):>6.3f} "
                     + " ".join(f"{b[p] / 1e6:>12.3f}" for p in MLP_PARTS) + f" {ratio}")
    return "\n".join(lines)


def plot(records: list[dict], path: str) -> None:
    """Writes a PNG: decode ms/token vs active fraction per backend, dense, peer and the limit."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("--plot needs matplotlib; pip install matplotlib.") from None
    decode = [r for r in records if r["kind"] == "decode"]
    copy = next(r["achieved_gb_s"] for r in records if r["kind"] == "copy")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for backend in sorted({r["backend"] for r in decode if r["mode"] == "sparse"}):
        rows = sorted((r for r in decode if r["mode"] == "sparse" and r["backend"] == backend),
                      key=lambda r: r["active_fraction"])
        x = [r["active_fraction"] for r in rows]
        ax.errorbar(x, [r["decode_ms_median"] for r in rows],
                    yerr=[[r["decode_ms"]["median"] - r["decode_ms"]["q1"] for r in rows],
                          [r["decode_ms"]["q3"] - r["decode_ms"]["median"] for r in rows]],
                    fmt="o-", capsize=3, label=f"sparse ({backend})")
        ax.plot(x, [r["limit_ms"] for r in rows], "k:", label="bandwidth limit (bytes / GB/s)")
    for r in decode:
        if r["mode"] != "sparse":
            ax.axhline(r["decode_ms_median"], ls="--", color="gray" if r["mode"] == "dense"
                       else "tab:red", label=f"{r['mode']} ({r['backend']})")
    first = decode[0]
    ax.set_title(f"{first['shape']} x {first['layers']} layers, {first['dtype']}, batch 1, "
                 f"copy {copy:.0f} GB/s")
    ax.set_xlabel("MLP neurons computed (fraction)")
    ax.set_ylabel("decode latency (ms/token)")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
