"""`sparseinfer bench`: decode speed against the active fraction on a random-weight model."""

from __future__ import annotations

import argparse
import sys

from sparseinfer_jax.cli.common import add_quantize_arg, check_report_outputs
from sparseinfer_jax.errors import (
    UserError,
    write_plot,
    write_report,
)


def _bench(args: argparse.Namespace) -> int:
    from sparseinfer_jax import bench

    def split(text: str, kind, flag: str) -> tuple:
        try:
            return tuple(kind(v) for v in text.split(",") if v.strip())
        except ValueError:
            raise UserError(f"{flag} must be a comma list, got '{text}'.") from None

    settings = bench.Settings(
        shape=args.shape, layers=args.layers, dtype=args.dtype,
        modes=split(args.modes, str, "--modes"), backends=split(args.backend, str, "--backend"),
        active=split(args.active, float, "--active"), tokens=args.tokens, repeats=args.repeats,
        kernels=not args.no_kernels, batches=split(args.batches, int, "--batches"),
        peer=args.peer, seed=args.seed, quantize=args.quantize)
    settings.check()
    check_report_outputs(args)
    def save(records: list[dict]) -> None:
        write_report(args.json, records, "bench")

    records = bench.run(settings, log=lambda line: print(line, flush=True),
                        save=save if args.json else None)
    print()
    print(bench.format_bytes(records))
    kernels = bench.format_kernels(records)
    if kernels:
        print()
        print(kernels)
    if args.plot:
        write_plot(args.plot, lambda tmp: bench.plot(records, tmp), "bench")
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0


def add_parser(sub) -> None:
    """Adds `sparseinfer bench` to the subcommands `sub`."""
    be = sub.add_parser("bench", help="decode speed vs active fraction on a random-weight model")
    be.add_argument("--shape", default="tiny",
                    help="tiny, 1b (TinyLlama-1.1B), 7b (Llama-2-7B) or 13b (Llama-2-13B)")
    be.add_argument("--layers", type=int, default=None, help="cut the depth to N layers")
    be.add_argument("--dtype", default="float32", help="bfloat16 or float32")
    be.add_argument("--modes", default="dense,sparse", help="comma list of dense,sparse")
    be.add_argument("--backend", default="auto",
                    help="comma list of sparse MLP backends (auto: the path the model takes here)")
    be.add_argument("--active", default="0.05,0.1,0.2,0.5,1.0",
                    help="predicted active fractions to set alpha for, in (0, 1]")
    be.add_argument("--tokens", type=int, default=64, help="decode steps per timed loop")
    be.add_argument("--repeats", type=int, default=5, help="timed loops per setting")
    be.add_argument("--batches", default="", help="also decode at these batch sizes (union)")
    be.add_argument("--no-kernels", action="store_true", help="skip the per-kernel timings")
    be.add_argument("--peer", choices=("hf",), default=None,
                    help="also time Hugging Face transformers (torch, CPU) on the same weights")
    be.add_argument("--seed", type=int, default=0)
    add_quantize_arg(be)
    be.add_argument("--json", default=None, help="write the records to this JSON file")
    be.add_argument("--plot", default=None, help="write a PNG: latency vs active fraction")
    be.set_defaults(run=_bench)
