"""`sparseinfer calibrate`: choose each layer's alpha on a text and write it to the checkpoint."""

from __future__ import annotations

import argparse
import os

from sparseinfer_jax.cli.common import (
    add_model_args,
    add_text_args,
    check_text_args,
    encode_windows,
    model_path,
)
from sparseinfer_jax.errors import UserError


def _calibrate(args: argparse.Namespace) -> int:
    from sparseinfer_jax.api.loading import load
    from sparseinfer_jax.io import checkpoint
    from sparseinfer_jax.model.config import PREDICTORS
    from sparseinfer_jax.tuning.calibration import calibrate_predictors, check_targets, format_table

    if args.alpha is not None:
        raise UserError("calibrate chooses alpha itself; drop --alpha (or set it at load with "
                        "`generate --alpha`).")
    if args.mode != "dense":
        raise UserError("calibrate replays the model densely and fits each predictor; drop "
                        "--mode.")
    check_targets(args.target_recall, args.target_sparsity, args.max_ppl_increase)
    check_text_args(args)
    path = model_path(args)
    if not args.dry_run and checkpoint.is_checkpoint(path):  # the alphas go there at the end
        checkpoint.check_config_writable(path)
    model, tokenizer = load(path, dtype=args.dtype, mode="dense", backend=args.backend)
    windows = encode_windows(args, tokenizer, path)
    cals = calibrate_predictors(
        model,
        windows,
        PREDICTORS if args.predictor == "auto" else (args.predictor,),
        target_recall=args.target_recall,
        target_sparsity=args.target_sparsity,
        max_ppl_increase=args.max_ppl_increase,
        backend=args.backend,
        progress=True,
    )
    cal = cals[0]
    if args.target_recall is not None:
        target = f"recall >= {args.target_recall}"
    elif args.target_sparsity is not None:
        target = f"predicted sparsity <= {args.target_sparsity}"
    else:
        target = f"perplexity at most {args.max_ppl_increase:g}% above dense"
    for c in cals[1:]:
        print(f"predictor {c.predictor}: MLP bytes read {c.mean_bytes:.4f} of dense")
    print(f"calibrated on {cal.tokens} tokens for {target}, predictor {cal.predictor} "
          f"(MLP bytes read {cal.mean_bytes:.4f} of dense):")
    print(format_table(cal))
    if cal.perplexity is not None:
        rise = 100 * (cal.perplexity / cal.dense_perplexity - 1)
        print(
            f"perplexity {cal.perplexity:.4f} (dense {cal.dense_perplexity:.4f}, {rise:+.2f}%)"
        )
    alphas = ",".join(f"{a:g}" for a in cal.config_alphas())
    if args.dry_run:
        print(f"dry run: nothing written (alpha {alphas})")
    elif checkpoint.is_checkpoint(path):
        checkpoint.write_calibration(path, cal.config_alphas(), cal.predictor,
                                     f"sparseinfer calibrate on {os.path.basename(args.text)}: "
                                     f"{target}")
        print(f"wrote alpha {alphas}, predictor {cal.predictor} to {path}/config.json")
    else:
        print(
            f"{path} is not a converted checkpoint, so nothing was written: add \"sparseinfer\": "
            f"{{\"alpha\": [{alphas}], \"predictor\": \"{cal.predictor}\"}} to its config.json "
            f"(the alphas fit predictor {cal.predictor}; --alpha {alphas} alone runs the "
            "checkpoint's own predictor), or convert it with sparseinfer-convert and calibrate the "
            "checkpoint."
        )
    return 0


def add_parser(sub) -> None:
    """Adds `sparseinfer calibrate` to the subcommands `sub`."""
    cal = sub.add_parser("calibrate", help="choose each layer's alpha on a text")
    add_model_args(cal)
    add_text_args(cal)
    target = cal.add_mutually_exclusive_group(required=True)
    target.add_argument("--target-recall", type=float, default=None, help="in (0, 1]")
    target.add_argument("--target-sparsity", type=float, default=None, help="in [0, 1)")
    target.add_argument(
        "--max-ppl-increase",
        type=float,
        default=None,
        metavar="P",
        help="percent: skip as much as keeps sparse perplexity within P%% of dense on the text",
    )
    cal.add_argument("--predictor", choices=("auto", "sign", "signmag"), default="auto",
                     help="predictor to calibrate (auto: each, keep the one reading fewer bytes)")
    cal.add_argument("--dry-run", action="store_true", help="print the alphas, write nothing")
    cal.set_defaults(run=_calibrate)
