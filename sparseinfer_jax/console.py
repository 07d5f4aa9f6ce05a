"""The console scripts `sparseinfer` and `sparseinfer-convert`.

This module imports nothing heavy: each script imports its command line (and so jax) inside
`errors.run_command`'s reach, so Ctrl-C while jax is still importing prints `interrupted` and
exits 130 like a Ctrl-C at any later moment, never a traceback.
"""

from __future__ import annotations

import importlib
import sys
from typing import NoReturn

from sparseinfer_jax.errors import INTERRUPTED_EXIT, exit_process


def _run(module: str) -> NoReturn:
    try:
        main = importlib.import_module(module).main
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        exit_process(INTERRUPTED_EXIT)
    exit_process(main())


def sparseinfer() -> NoReturn:
    """`sparseinfer`: `sparseinfer_jax.cli.main` on sys.argv."""
    _run("sparseinfer_jax.cli")


def sparseinfer_convert() -> NoReturn:
    """`sparseinfer-convert`: `convert.cli.main` on sys.argv."""
    _run("convert.cli")
