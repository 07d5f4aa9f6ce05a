"""The `sparseinfer` command line."""

from __future__ import annotations

import argparse
import sys

from sparseinfer_jax import compile_report
from sparseinfer_jax.errors import UserError
from sparseinfer_jax.mlp import BACKENDS, MODES


def _alpha(text: str) -> float | list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"alpha must be a number or a comma list, got '{text}'"
        ) from None
    return values[0] if len(values) == 1 else values


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default=None,
        help="converted checkpoint folder, or a Hugging Face folder / hub id "
        "(default: the small ReLU-Llama shipped with the package)",
    )
    p.add_argument(
        "--dtype",
        choices=("bfloat16", "float32"),
        default=None,
        help="weights' dtype (default: the checkpoint's)",
    )
    p.add_argument("--mode", choices=MODES, default="dense", help="decode-step MLP mode")
    p.add_argument("--backend", choices=BACKENDS, default="auto", help="sparse kernel backend")
    p.add_argument(
        "--alpha",
        type=_alpha,
        default=None,
        help="conservativeness: one number or one per layer, comma-separated "
        "(larger skips fewer neurons; default: the checkpoint's)",
    )


def _add_mesh_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--mesh",
        default=None,
        help="device mesh, e.g. data=1,model=4: heads and MLP neurons split over model, the "
        "batch over data (default: one device, or all local devices on model when the model "
        "does not fit one)",
    )
    p.add_argument(
        "--distributed",
        action="store_true",
        help="join a multi-host job first (jax.distributed.initialize; see docs/multihost.md)",
    )


def _mesh(args: argparse.Namespace):
    """The `--mesh` as a jax Mesh ("auto" without it), after joining a multi-host job if asked."""
    from sparseinfer_jax import sharding

    if args.distributed:
        sharding.initialize_distributed()
    return "auto" if args.mesh is None else sharding.mesh_from_text(args.mesh)


def _generate(args: argparse.Namespace) -> int:
    from sparseinfer_jax.generation import generate
    from sparseinfer_jax.loading import SHIPPED_MODEL, load

    args.model = args.model or SHIPPED_MODEL
    model, tokenizer = load(
        args.model,
        dtype=args.dtype,
        mode=args.mode,
        backend=args.backend,
        alpha=args.alpha,
        mesh=_mesh(args),
    )
    if tokenizer is None:
        raise UserError(f"{args.model} has no tokenizer.json, so text prompts cannot be encoded.")
    result = generate(
        model,
        args.prompt,
        tokenizer=tokenizer,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        stats="predicted" if args.stats and args.mode != "dense" else None,
    )
    for prompt, text in zip(args.prompt, result.text, strict=True):
        print(prompt + text)
    t = result.timing
    line = f"[{args.mode}] {t.new_tokens} tokens, compile {t.compile_s:.2f} s"
    if t.prefill_s is not None:
        line += f", prefill {t.prefill_s * 1e3:.1f} ms"
    line += f", decode {t.tokens_per_s:.1f} tokens/s"
    print(line, file=sys.stderr)
    if result.stats is not None:
        sparsity = " ".join(f"{s:.2f}" for s in result.stats.predicted_sparsity)
        print(f"predicted sparsity per layer: {sparsity}", file=sys.stderr)
    return 0


def _model_path(args: argparse.Namespace) -> str:
    from sparseinfer_jax.loading import SHIPPED_MODEL

    return args.model or args.model_path or SHIPPED_MODEL


def _check_text_args(args: argparse.Namespace) -> None:
    """Fails fast (before loading the model) on a bad text file or window sizes."""
    from sparseinfer_jax.calibration import read_text

    read_text(args.text)
    if args.max_tokens is not None and args.max_tokens < 2:
        raise UserError(f"--max-tokens must be at least 2, got {args.max_tokens}.")
    if args.window < 2:
        raise UserError(f"--window must be at least 2, got {args.window}.")


def _encode_windows(args: argparse.Namespace, tokenizer, model_path: str):
    from sparseinfer_jax.calibration import read_text, token_windows

    text = read_text(args.text)
    if tokenizer is None:
        raise UserError(f"{model_path} has no tokenizer.json, so the text cannot be encoded.")
    return token_windows(tokenizer.encode(text), args.window, args.max_tokens)


def _calibrate(args: argparse.Namespace) -> int:
    from sparseinfer_jax import checkpoint
    from sparseinfer_jax.calibration import calibrate, check_targets, format_table
    from sparseinfer_jax.loading import load

    check_targets(args.target_recall, args.target_sparsity, args.max_ppl_increase)
    _check_text_args(args)
    path = _model_path(args)
    model, tokenizer = load(path, dtype=args.dtype, mode="dense", backend=args.backend)
    windows = _encode_windows(args, tokenizer, path)
    cal = calibrate(
        model,
        windows,
        target_recall=args.target_recall,
        target_sparsity=args.target_sparsity,
        max_ppl_increase=args.max_ppl_increase,
        backend=args.backend,
        progress=True,
    )
    if args.target_recall is not None:
        target = f"recall >= {args.target_recall}"
    elif args.target_sparsity is not None:
        target = f"predicted sparsity <= {args.target_sparsity}"
    else:
        target = f"perplexity at most {args.max_ppl_increase:g}% above dense"
    print(f"calibrated on {cal.tokens} tokens for {target}:")
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
        hf, block = checkpoint.read_checkpoint_config(path)
        block["alpha"] = cal.config_alphas()
        checkpoint.write_checkpoint_config(path, hf, block)
        print(f"wrote alpha {alphas} to {path}/config.json")
    else:
        print(
            f"{path} is not a converted checkpoint, so nothing was written: pass --alpha {alphas}, "
            "or convert it with sparseinfer-convert and calibrate the checkpoint."
        )
    return 0


def _eval(args: argparse.Namespace) -> int:
    import json

    from sparseinfer_jax.evaluation import evaluate, format_report
    from sparseinfer_jax.loading import load

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if not modes or bad:
        raise UserError(f"--modes must be a comma list of {', '.join(MODES)}, got '{args.modes}'.")
    _check_text_args(args)
    path = _model_path(args)
    model, tokenizer = load(
        path, dtype=args.dtype, backend=args.backend, alpha=args.alpha, mesh=_mesh(args)
    )
    windows = _encode_windows(args, tokenizer, path)
    result = evaluate(model, windows, modes=modes, backend=args.backend, progress=True)
    if args.plot:
        from sparseinfer_jax.evaluation import alpha_sweep
        from sparseinfer_jax.plots import plot_report

        scales = [float(v) for v in args.sweep.split(",")]
        result["sweep"] = alpha_sweep(model, windows, scales, backend=args.backend)
        plot_report(result, args.plot)
    print(f"{result['tokens']} tokens in {len(windows)} windows")
    print(format_report(result))
    if args.plot:
        print(f"wrote {args.plot}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
    return 0


def _bench(args: argparse.Namespace) -> int:
    import json

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
        peer=args.peer, seed=args.seed)
    settings.check()
    if args.plot:
        import importlib.util

        if importlib.util.find_spec("matplotlib") is None:  # fail before measuring, not after
            raise UserError("--plot needs matplotlib; pip install matplotlib.")
    def save(records: list[dict]) -> None:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=1)
            f.write("\n")

    records = bench.run(settings, log=lambda line: print(line, flush=True),
                        save=save if args.json else None)
    kernels = bench.format_kernels(records)
    if kernels:
        print()
        print(kernels)
    if args.plot:
        bench.plot(records, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0


def _add_text_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_path", nargs="?", default=None, metavar="MODEL", help="same as --model")
    p.add_argument("--text", required=True, help="UTF-8 text file")
    p.add_argument("--max-tokens", type=int, default=None, help="use only the first N tokens")
    p.add_argument("--window", type=int, default=128, help="tokens per forward window")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparseinfer", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate text from a prompt")
    _add_model_args(gen)
    _add_mesh_args(gen)
    gen.add_argument(
        "--prompt", action="append", required=True, help="prompt text (repeat for a batch)"
    )
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    gen.add_argument("--top-k", type=int, default=None)
    gen.add_argument("--top-p", type=float, default=None)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--stats", action="store_true", help="print per-layer predicted sparsity")
    gen.set_defaults(run=_generate)
    cal = sub.add_parser("calibrate", help="choose each layer's alpha on a text")
    _add_model_args(cal)
    _add_text_args(cal)
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
    cal.add_argument("--dry-run", action="store_true", help="print the alphas, write nothing")
    cal.set_defaults(run=_calibrate)
    ev = sub.add_parser("eval", help="perplexity and predictor quality per MLP mode")
    _add_model_args(ev)
    _add_mesh_args(ev)
    _add_text_args(ev)
    ev.add_argument("--modes", default="dense,sparse", help="comma list of " + ",".join(MODES))
    ev.add_argument("--json", default=None, help="also write the results to this JSON file")
    ev.add_argument("--plot", default=None, help="write a PNG: per-layer figures and a sweep")
    ev.add_argument("--sweep", default="0.9,0.95,1,1.05,1.1,1.2",
                    help="alpha scale factors swept for --plot (perplexity vs sparsity)")
    ev.set_defaults(run=_eval)
    be = sub.add_parser("bench", help="decode speed vs active fraction on a random-weight model")
    be.add_argument("--shape", default="tiny", help="tiny, 1b (TinyLlama-1.1B) or 7b (Llama-2-7B)")
    be.add_argument("--layers", type=int, default=None, help="cut the depth to N layers")
    be.add_argument("--dtype", default="float32", help="bfloat16 or float32")
    be.add_argument("--modes", default="dense,sparse", help="comma list of dense,sparse")
    be.add_argument("--backend", default="xla", help="comma list of sparse kernel backends")
    be.add_argument("--active", default="0.05,0.1,0.2,0.5,1.0",
                    help="predicted active fractions to set alpha for, in (0, 1]")
    be.add_argument("--tokens", type=int, default=64, help="decode steps per timed loop")
    be.add_argument("--repeats", type=int, default=5, help="timed loops per setting")
    be.add_argument("--batches", default="", help="also decode at these batch sizes (union)")
    be.add_argument("--no-kernels", action="store_true", help="skip the per-kernel timings")
    be.add_argument("--peer", choices=("hf",), default=None,
                    help="also time Hugging Face transformers (torch, CPU) on the same weights")
    be.add_argument("--seed", type=int, default=0)
    be.add_argument("--json", default=None, help="write the records to this JSON file")
    be.add_argument("--plot", default=None, help="write a PNG: latency vs active fraction")
    be.set_defaults(run=_bench)
    compile_report.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of `sparseinfer`; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
