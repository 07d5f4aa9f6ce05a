"""`sparseinfer eval`: perplexity and predictor quality per MLP mode on a text."""

from __future__ import annotations

import argparse
import math

from sparseinfer_jax.cli.common import (
    add_mesh_args,
    add_model_args,
    add_quantize_arg,
    add_text_args,
    check_report_outputs,
    check_text_args,
    encode_windows,
    mesh_arg,
    model_path,
)
from sparseinfer_jax.errors import (
    UserError,
    write_plot,
    write_report,
)
from sparseinfer_jax.model.mlp import MODES

DEFAULT_SWEEP = "0.9,0.95,1,1.05,1.1,1.2"


def _sweep(text: str) -> list[float]:
    """`--sweep` as a list of alpha scale factors: finite numbers > 0."""
    try:
        scales = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        scales = []
    if not scales or not all(math.isfinite(v) and v > 0 for v in scales):
        raise UserError(
            f"--sweep must be a comma list of positive alpha scale factors such as 0.9,1,1.1, "
            f"got '{text}'."
        )
    return scales


def _eval(args: argparse.Namespace) -> int:
    from sparseinfer_jax.api.loading import load
    from sparseinfer_jax.tuning.evaluation import check_modes, evaluate, format_report

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    check_modes(modes, "--modes")
    if args.mode != "dense":
        raise UserError("eval runs each mode of --modes; give --modes instead of --mode.")
    if args.alpha is not None and "sparse" not in modes:
        raise UserError("--alpha sets the sparse predictor; add sparse to --modes or drop --alpha.")
    if args.sweep is not None and not args.plot:
        raise UserError("--sweep sets the alphas --plot draws; add --plot FILE or drop --sweep.")
    check_text_args(args)
    scales = _sweep(args.sweep or DEFAULT_SWEEP) if args.plot else None
    if args.plot and not {"dense", "sparse"} <= set(modes):
        raise UserError("--plot draws sparse against dense: give --modes with both, such as "
                        "dense,sparse.")
    path = model_path(args)
    check_report_outputs(args, inputs=[path, args.text] if args.text else [path])
    model, tokenizer = load(
        path, dtype=args.dtype, backend=args.backend, alpha=args.alpha, mesh=mesh_arg(args),
        quantize=args.quantize,
    )
    windows = encode_windows(args, tokenizer, path)
    result = evaluate(model, windows, modes=modes, backend=args.backend, progress=True)
    if args.plot:
        from sparseinfer_jax.tuning.evaluation import alpha_sweep
        from sparseinfer_jax.tuning.plots import plot_report

        result["sweep"] = alpha_sweep(model, windows, scales, backend=args.backend)
        write_plot(args.plot, lambda tmp: plot_report(result, tmp), "eval")
    print(f"{result['tokens']} tokens in {len(windows)} windows")
    print(format_report(result))
    if args.plot:
        print(f"wrote {args.plot}")
    if args.json:
        write_report(args.json, result, "eval", indent=2)
    return 0


def add_parser(sub) -> None:
    """Adds `sparseinfer eval` to the subcommands `sub`."""
    ev = sub.add_parser("eval", help="perplexity and predictor quality per MLP mode")
    add_model_args(ev)
    add_quantize_arg(ev)
    add_mesh_args(ev)
    add_text_args(ev)
    ev.add_argument("--modes", default="dense,sparse", help="comma list of " + ",".join(MODES))
    ev.add_argument("--json", default=None, help="also write the results to this JSON file")
    ev.add_argument("--plot", default=None, help="write a PNG: per-layer figures and a sweep")
    ev.add_argument("--sweep", default=None,
                    help=f"alpha scale factors swept for --plot (perplexity vs sparsity; default "
                         f"{DEFAULT_SWEEP})")
    ev.set_defaults(run=_eval)
