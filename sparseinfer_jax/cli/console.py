"""The console scripts `sparseinfer` and `sparseinfer-convert`.

This module imports nothing heavy: each script imports its command line (and so jax) inside
`errors.run_command`, so Ctrl-C while jax is still importing prints `interrupted` and exits 130
like a Ctrl-C at any later moment, never a traceback.
"""

from __future__ import annotations

import importlib
from typing import NoReturn

from sparseinfer_jax.errors import exit_process, run_command


def _run(module: str) -> NoReturn:
    exit_process(run_command(lambda: importlib.import_module(module).main()))


def sparseinfer() -> NoReturn:
    """`sparseinfer`: `sparseinfer_jax.cli.main` on sys.argv."""
    _run("sparseinfer_jax.cli.main")


def sparseinfer_convert() -> NoReturn:
    """`sparseinfer-convert`: `convert.cli.main` on sys.argv."""
    _run("convert.cli")
