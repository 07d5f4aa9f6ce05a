"""`sparseinfer generate`: text from a prompt, streamed; `--compare` decodes densely beside it."""

from __future__ import annotations

import argparse
import functools
import sys

import numpy as np

from sparseinfer_jax.cli.common import (
    add_mesh_args,
    add_model_args,
    add_quantize_arg,
    mesh_arg,
    model_path,
    peek_config,
)
from sparseinfer_jax.errors import (
    UserError,
)


def _check_generate_args(args: argparse.Namespace) -> None:
    """Fails fast (before loading the model) on bad prompts and sampling values."""
    from sparseinfer_jax.runtime.requests import (
        check_new_tokens,
        check_sampling,
        check_seed,
        check_text,
    )

    for prompt in args.prompt:
        check_text(prompt, "--prompt")
    check_sampling(args.temperature, args.top_p, args.top_k, args.repetition_penalty)
    check_seed(args.seed)
    if args.alpha is not None and args.mode == "dense":
        raise UserError("--alpha sets the sparse predictor, which --mode dense does not use; add "
                        "--mode sparse or drop --alpha.")
    if args.mode == "dense" and (args.stats or args.backend != "auto"):
        flag = "--stats" if args.stats else f"--backend {args.backend}"
        raise UserError(f"{flag} is about the sparse MLP, which --mode dense does not run; add "
                        f"--mode sparse or drop {flag.split()[0]}.")
    if args.compare and args.mode == "dense":
        raise UserError("--compare compares a sparse mode with dense; add --mode sparse.")
    if args.compare and args.max_new_tokens < 2:
        raise UserError("--compare needs --max-new-tokens 2 or more: the first new token comes "
                        "from the dense prefill, so sparse decoding starts at the second.")
    check_new_tokens(args.max_new_tokens, peek_config(args.model), flag="--max-new-tokens")


def _generate(args: argparse.Namespace) -> int:
    from sparseinfer_jax.api.loading import load
    from sparseinfer_jax.runtime.generation import generate
    from sparseinfer_jax.runtime.streaming import TextStream

    args.model = model_path(args)
    _check_generate_args(args)
    model, tokenizer = load(
        args.model,
        dtype=args.dtype,
        mode=args.mode,
        backend=args.backend,
        alpha=args.alpha,
        mesh=mesh_arg(args),
        quantize=args.quantize,
    )
    if tokenizer is None:
        raise UserError(f"{args.model} has no tokenizer.json, so text prompts cannot be encoded; "
                        "copy the model's tokenizer.json into it.")
    stream = sys.stdout.isatty() if args.stream is None else args.stream
    stream = stream and len(args.prompt) == 1  # a batch is printed when it is done
    run = functools.partial(
        generate,
        model,
        args.prompt,
        tokenizer=tokenizer,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
    )
    printer = None
    if stream:
        print(args.prompt[0], end="", flush=True)
        eos = model.config.eos_token_ids
        printer = TextStream(tokenizer, sys.stdout, eos_token_ids=eos)
    want_stats = (args.stats or args.compare) and args.mode != "dense"
    result = run(stats="predicted" if want_stats else None, stream=printer)
    if printer is not None:
        printer.finish()
        print(flush=True)
    else:
        for prompt, text in zip(args.prompt, result.text, strict=True):
            print(prompt + text)
    if args.compare:
        # Dense decoding of the same tokens (same seed, so the same sampling noise) says at each
        # step whether it would have chosen them too. It runs the same chunked decode when
        # streaming (into nothing), so the speeds compare like with like; the prefill program is
        # shared, only the dense decode compiles.
        follow = [row[:n] for row, n in zip(result.tokens, result.lengths, strict=True)]
        quiet = (lambda tokens: None) if stream else None
        dense = run(mode="dense", follow=follow, stream=quiet)
        print(_comparison(model, result, dense, args.mode), file=sys.stderr)
    else:
        print(_timing_line(args.mode, result.timing), file=sys.stderr)
    if args.stats and result.stats is not None:
        sparsity = " ".join(f"{s:.2f}" for s in result.stats.predicted_sparsity)
        # The oracle skips the neurons that are zero: its figures are measured, not predicted.
        what = "measured (oracle)" if args.mode == "oracle" else "predicted"
        print(f"{what} sparsity per layer: {sparsity}", file=sys.stderr)
        nbytes = " ".join(f"{b:.2f}" for b in result.stats.mlp_bytes_fraction)
        print(f"MLP bytes read per token, of dense, per layer: {nbytes}", file=sys.stderr)
    return 0


def _timing_line(mode: str, t) -> str:
    line = f"[{mode}] {t.new_tokens} tokens, compile {t.compile_s:.2f} s"
    if t.prefill_s is not None:
        line += f", prefill {t.prefill_s * 1e3:.1f} ms"
    return line + f", decode {t.tokens_per_s:.1f} tokens/s"


def _agreement(sparse, dense) -> str:
    """How many of the sparse tokens dense decoding picks too, fed the same text."""
    agreed, total = int(dense.agreed.sum()), int(sparse.lengths.sum())
    text = "all" if agreed == total else f"{agreed} of"
    return f"dense picks the same at {text} {total} steps ({agreed / total:.0%}), fed the same text"


def _mlp_bytes(model, result) -> tuple[float, float]:
    """MLP bytes one decode step reads, (sparse, dense), summed over layers: the sign bits, the
    gate rows of the candidates and the up and down rows of the fired ones (`LayerStats`)."""
    from sparseinfer_jax.model.metrics import mlp_weights, row_bytes

    cfg = model.config
    dense = 3 * cfg.intermediate_size * row_bytes(cfg, *mlp_weights(model))
    fractions = np.asarray(result.stats.mlp_bytes_fraction)
    return float(np.sum(fractions)) * dense, dense * cfg.num_hidden_layers


def _comparison(model, sparse, dense, mode: str) -> str:
    """The few lines `--compare` prints: tokens, neurons and bytes skipped, both speeds, and
    which path the sparse MLP took on this device (`backend.describe`)."""
    from pallas_kernels.backend import describe

    mib = 2**20
    read, full = _mlp_bytes(model, sparse)
    skipped = 1 - float(np.mean(sparse.stats.computed_fraction))
    s, d = sparse.timing, dense.timing
    speedup = s.tokens_per_s / d.tokens_per_s
    lines = [
        f"{mode} vs dense, same prompt and seed:",
        f"  tokens   {_agreement(sparse, dense)}",
        f"  MLP      skipped {skipped:.0%} of neurons per token: read {read / mib:.2f} of "
        f"{full / mib:.2f} MiB (sign bits included)",
        f"  decode   {mode} {s.tokens_per_s:.0f} tokens/s, dense {d.tokens_per_s:.0f} tokens/s "
        f"({speedup:.2f}x)",
        f"  compile  {mode} {s.compile_s:.1f} s, dense {d.compile_s:.1f} s (prefill shared)",
        f"  path     {describe(model.backend)}",
    ]
    if speedup < 1:
        lines.append("  note     skipping pays off where reading weights bounds a step: "
                     "`sparseinfer bench --shape 1b`")
    return "\n".join(lines)


def add_parser(sub) -> None:
    """Adds `sparseinfer generate` to the subcommands `sub`."""
    gen = sub.add_parser("generate", help="generate text from a prompt")
    add_model_args(gen)
    add_quantize_arg(gen)
    add_mesh_args(gen)
    gen.add_argument(
        "--prompt", action="append", required=True, help="prompt text (repeat for a batch)"
    )
    gen.add_argument("--max-new-tokens", type=int, default=48)
    gen.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
    gen.add_argument("--top-k", type=int, default=None)
    gen.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling; 1 = off")
    gen.add_argument(
        "--repetition-penalty",
        type=float,
        default=1.2,
        help="divide the logits of tokens already seen by this (as transformers); 1 = off",
    )
    gen.add_argument("--seed", type=int, default=0, help="sampling seed")
    gen.add_argument(
        "--compare",
        action="store_true",
        help="also decode densely (same prompt and seed) and print whether the tokens agree, "
        "the neurons and bytes skipped and both speeds",
    )
    gen.add_argument(
        "--stream",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="print tokens as they are produced, for one prompt (default: when stdout is a "
        "terminal)",
    )
    gen.add_argument("--stats", action="store_true", help="print per-layer predicted sparsity")
    gen.set_defaults(run=_generate)
