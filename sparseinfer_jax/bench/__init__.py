"""Measuring speed: random-weight models of named shapes, timed decoding and kernels, tables and
plots (`records` runs them), and the GPU compile report."""

from sparseinfer_jax.bench.alphas import alpha_grid, alpha_keeping, fit_alphas
from sparseinfer_jax.bench.records import (
    Settings,
    decode_record,
    fitted_alphas,
    kernel_records,
    run,
    step_bytes,
)
from sparseinfer_jax.bench.report import KERNEL_BASE, format_bytes, format_kernels, plot
from sparseinfer_jax.bench.shapes import PROMPT_TOKENS, SHAPES, random_model, shape_config
from sparseinfer_jax.bench.timing import (
    copy_bandwidth,
    in_a_loop,
    read_bandwidth,
    spread,
    time_in_a_loop,
)

__all__ = [
    "KERNEL_BASE",
    "PROMPT_TOKENS",
    "SHAPES",
    "Settings",
    "alpha_grid",
    "alpha_keeping",
    "copy_bandwidth",
    "decode_record",
    "fit_alphas",
    "fitted_alphas",
    "format_bytes",
    "format_kernels",
    "in_a_loop",
    "kernel_records",
    "plot",
    "random_model",
    "read_bandwidth",
    "run",
    "shape_config",
    "spread",
    "step_bytes",
    "time_in_a_loop",
]
