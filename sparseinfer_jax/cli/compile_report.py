"""`sparseinfer compile-report`: compile the kernels and programs for GPUs or TPUs without one."""

from __future__ import annotations

import argparse
import sys

import jax

from sparseinfer_jax.bench import compile_report_cpu, compile_report_tpu
from sparseinfer_jax.bench.compile_policy import failures, notes
from sparseinfer_jax.bench.compile_report import HEADER, check, run
from sparseinfer_jax.bench.gpu_spec import DEFAULT_GPUS, GPUS
from sparseinfer_jax.bench.shapes import DTYPES, SHAPES
from sparseinfer_jax.bench.toolchain import check_plugin, find_ptxas
from sparseinfer_jax.errors import UserError, check_output_file, write_report


def command(args: argparse.Namespace) -> int:
    """`sparseinfer compile-report`: prints the table, writes --json, exit 1 on a failure."""
    try:
        batches = [int(b) for b in args.batches.split(",")]
    except ValueError:
        raise UserError(
            f"--batches must be a comma list of integers, got '{args.batches}'.") from None
    tpus = args.tpu.split(",") if args.tpu else []
    # --tpu or --cpu alone compiles for those only (libtpu and the CUDA plugin are separate
    # installs).
    gpu = args.gpu if args.gpu is not None else "" if tpus or args.cpu else ",".join(DEFAULT_GPUS)
    gpus = list(GPUS) if gpu == "all" else [g for g in gpu.split(",") if g]
    if not gpus and not tpus and not args.cpu:
        raise UserError("--gpu names no GPU; give a comma list of "
                        f"{', '.join(GPUS)} or GPU spec files, or all.")
    if gpus:  # bad flags fail before the table starts
        check(gpus, args.shape, batches, args.layers)
    for name in tpus:
        compile_report_tpu.check_tpu(name)
    if args.json is not None:
        check_output_file(args.json, "--json")
    # The plugin registers only when JAX's platform is the CPU (else it looks for a GPU driver);
    # the cuda backend then still compiles, for the compile-only devices of a topology.
    jax.config.update("jax_platforms", "cpu")
    # Compile-only executables cannot be loaded back from JAX's persistent cache (a rerun warned
    # "PjRtCompiler must be constructed with a Client"), and nothing here is run: keep it off.
    jax.config.update("jax_enable_compilation_cache", False)
    if gpus:  # a missing compiler fails before the table's header, not under it
        check_plugin()
        find_ptxas()
    records, bad = [], []
    settings = dict(layers=args.layers, dtype=args.dtype, programs=not args.no_programs,
                    log=lambda s: print(s, flush=True))
    if gpus:
        print(HEADER, flush=True)
        records += run(gpus, args.shape, batches, **settings)
        bad += failures(records)
        for line in notes(records):
            print(f"note: {line}", flush=True)
    if tpus:
        print(compile_report_tpu.HEADER, flush=True)
        tpu_records = compile_report_tpu.run(tpus, args.shape, batches, **settings)
        records += tpu_records
        bad += compile_report_tpu.failures(tpu_records)
    if args.cpu:
        print(compile_report_cpu.HEADER, flush=True)
        cpu_records = compile_report_cpu.run(args.shape, batches, layers=args.layers,
                                             dtype=args.dtype, log=settings["log"])
        records += cpu_records
        bad += compile_report_cpu.failures(cpu_records)
    if args.json is not None:
        write_report(args.json, records, "compile-report")
    for line in bad:
        print(f"FAILED: {line}", file=sys.stderr)
    return 1 if bad else 0


def add_parser(sub) -> None:
    """Adds the `compile-report` subcommand to the `sparseinfer` parser's subparsers."""
    p = sub.add_parser("compile-report",
                       help="compile every kernel and the decode program for GPUs, offline")
    p.add_argument("--gpu", default=None,
                   help=f"comma list of {', '.join(GPUS)} or GPU spec files (.txtpb), or all "
                        f"(default {','.join(DEFAULT_GPUS)} unless --tpu is given)")
    p.add_argument("--tpu", default=None,
                   help=f"comma list of {', '.join(compile_report_tpu.TOPOLOGIES)}: compile the "
                        "Pallas TPU kernels (needs jax[tpu])")
    p.add_argument("--cpu", action="store_true",
                   help="compile the generate programs for this CPU and check their decode loops")
    p.add_argument("--shape", default="7b", help=", ".join(SHAPES))
    p.add_argument("--batches", default="1,4,16", help="comma list of batch sizes")
    p.add_argument("--layers", type=int, default=None,
                   help="cut the programs' depth to N layers (their kernels are the same)")
    p.add_argument("--dtype", default="bfloat16", choices=tuple(DTYPES))
    p.add_argument("--no-programs", action="store_true", help="compile the kernels only")
    p.add_argument("--json", default=None, help="write the records to this JSON file")
    p.set_defaults(run=command)
