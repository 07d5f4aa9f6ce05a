"""The `sparseinfer` command line."""

from __future__ import annotations

import argparse

from sparseinfer_jax.cli import bench, calibrate, compile_report, evaluate, generate
from sparseinfer_jax.cli.common import check_platforms, process_zero_prints, use_compile_cache
from sparseinfer_jax.errors import (
    run_command,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparseinfer", description=__doc__)
    no_cache = dict(action="store_true", help="do not keep compiled programs between runs "
                    "(default folder: ~/.cache/sparseinfer/jax; SPARSEINFER_COMPILE_CACHE=DIR or "
                    "off sets it)")
    parser.add_argument("--no-compile-cache", **no_cache)
    sub = parser.add_subparsers(dest="command", required=True)
    for command in (generate, calibrate, evaluate, bench, compile_report):
        command.add_parser(sub)
    # Also after the command (`sparseinfer generate --no-compile-cache`); SUPPRESS keeps a flag
    # given before the command when none comes after it.
    for command_parser in sub.choices.values():
        command_parser.add_argument("--no-compile-cache", default=argparse.SUPPRESS, **no_cache)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of `sparseinfer`; returns the exit status (2: a user error, 130: Ctrl-C)."""

    def command() -> int:
        args = build_parser().parse_args(argv)
        use_compile_cache(args)  # compile-report turns it off again (`compile_report.command`)
        with process_zero_prints(args):
            if args.command != "compile-report":  # it compiles for devices it does not have
                check_platforms()
            return args.run(args)

    return run_command(command)
