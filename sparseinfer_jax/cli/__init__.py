"""The `sparseinfer` command line: one module per command, each with its `add_parser`.

Imports nothing, so the console scripts (`console.py`) import jax only inside their Ctrl-C
handling."""
