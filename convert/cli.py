"""`sparseinfer-convert SRC OUT`: Hugging Face Llama folder or hub id -> SparseInfer checkpoint."""

from __future__ import annotations

import argparse
import os
import time

from convert.converter import convert
from sparseinfer_jax.cli.common import check_platforms
from sparseinfer_jax.errors import exit_process, run_command
from sparseinfer_jax.model.dtypes import STORED


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparseinfer-convert", description=__doc__)
    parser.add_argument("src", metavar="SRC",
                        help="Hugging Face model folder (config.json + safetensors) or hub id "
                             "org/name")
    parser.add_argument("out", metavar="OUT", help="checkpoint folder to create")
    parser.add_argument("--dtype", choices=STORED, default="bfloat16",
                        help="dtype of every weight (default: bfloat16)")
    parser.add_argument("--quantize", default=None, metavar="int8",
                        help="store every linear weight as int8 with one float32 scale per row "
                        "(embeddings and norms stay in --dtype, the compute dtype)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace OUT when it is a checkpoint written by this tool (only once "
                             "the new checkpoint is complete); anything else is never replaced")
    parser.add_argument("--alpha", type=float, default=None,
                        help="predictor alpha for every layer (default: the source's calibrated "
                        "sparseinfer.alpha, else calibrated)")
    parser.add_argument("--no-calibrate", action="store_true",
                        help="skip calibrating alpha on the built-in text (recall 0.99 per layer); "
                        "sparse mode then calibrates in memory at load, with a warning")
    return parser


def _folder_size(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def main(argv: list[str] | None = None) -> int:
    """Runs the converter; returns the exit status (2 on a user error, printed as one line;
    130 on Ctrl-C, with nothing left behind)."""
    args = build_parser().parse_args(argv)
    return run_command(lambda: _convert(args))


def _convert(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    check_platforms()
    notes: list[str] = []
    out = convert(args.src, args.out, dtype=args.dtype, overwrite=args.overwrite, alpha=args.alpha,
                  calibrate=not args.no_calibrate, say=notes.append, quantize=args.quantize)
    # Said once OUT is complete, calibrated and in place: a run that fails never claims it.
    kind = args.dtype if args.quantize is None else f"{args.quantize} weights, {args.dtype}"
    print(f"converted {args.src} -> {out} ({kind}, {_folder_size(out) / 2**20:.1f} MiB) "
          f"in {time.perf_counter() - start:.1f} s", flush=True)
    for note in notes:
        print(note)
    return 0


if __name__ == "__main__":
    exit_process(main())
