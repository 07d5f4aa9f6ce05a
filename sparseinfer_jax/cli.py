"""The `sparseinfer` command line."""

from __future__ import annotations

import argparse
import sys

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


def _generate(args: argparse.Namespace) -> int:
    from sparseinfer_jax.generation import generate
    from sparseinfer_jax.loading import SHIPPED_MODEL, load

    args.model = args.model or SHIPPED_MODEL
    model, tokenizer = load(
        args.model, dtype=args.dtype, mode=args.mode, backend=args.backend, alpha=args.alpha
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparseinfer", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate text from a prompt")
    _add_model_args(gen)
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
