"""The `sparseinfer` command line."""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import sys

import numpy as np

from sparseinfer_jax import compile_report
from sparseinfer_jax.errors import (
    UserError,
    atomic_file,
    check_output_file,
    check_writable_folder,
    exit_process,
    run_command,
)
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
        help="join a multi-host job first (jax.distributed.initialize; see docs/multihost.md); "
        "only process 0 prints",
    )
    p.add_argument(
        "--distributed-timeout",
        type=float,
        default=300.0,
        metavar="SECONDS",
        help="with --distributed: give up when the job has not formed within this time",
    )


def _mesh(args: argparse.Namespace):
    """The `--mesh` as a jax Mesh ("auto" without it)."""
    from sparseinfer_jax import sharding

    return "auto" if args.mesh is None else sharding.mesh_from_text(args.mesh)


def _process_zero_prints(args: argparse.Namespace) -> contextlib.AbstractContextManager:
    """With --distributed, joins the job; then only process 0 prints (every process computes the
    same replicated results). Errors raised inside still print everywhere."""
    if not getattr(args, "distributed", False):
        return contextlib.nullcontext()
    import jax

    from sparseinfer_jax import sharding

    if not args.distributed_timeout > 0:
        raise UserError(f"--distributed-timeout must be > 0, got {args.distributed_timeout}.")
    sharding.initialize_distributed(args.distributed_timeout)
    if jax.process_index() == 0:
        return contextlib.nullcontext()
    quiet = contextlib.ExitStack()
    devnull = quiet.enter_context(open(os.devnull, "w"))
    quiet.enter_context(contextlib.redirect_stdout(devnull))
    quiet.enter_context(contextlib.redirect_stderr(devnull))
    return quiet


def _peek_config(path: str):
    """The model's LlamaConfig from its config.json alone (no weights read), so limits can be
    checked before a long load; None when it cannot be read here (`load` then says why)."""
    from sparseinfer_jax import checkpoint
    from sparseinfer_jax.config import config_from_hf_dict

    try:
        if checkpoint.is_checkpoint(path):
            return config_from_hf_dict(checkpoint.read_checkpoint_config(path)[0])
        with open(os.path.join(path, "config.json")) as f:
            return config_from_hf_dict(json.load(f))
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return None


def _check_generate_args(args: argparse.Namespace) -> None:
    """Fails fast (before loading the model) on bad prompts and sampling values."""
    from sparseinfer_jax.generation import check_sampling, check_text

    for prompt in args.prompt:
        check_text(prompt, "--prompt")
    check_sampling(args.temperature, args.top_p, args.top_k)
    if args.compare and args.mode == "dense":
        raise UserError("--compare compares a sparse mode with dense; add --mode sparse.")
    if args.compare and args.max_new_tokens < 2:
        raise UserError("--compare needs --max-new-tokens 2 or more: the first new token comes "
                        "from the dense prefill, so sparse decoding starts at the second.")
    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}.")
    from sparseinfer_jax.calibration import position_limit

    cfg = _peek_config(args.model)
    if cfg is not None and args.max_new_tokens >= (position_limit(cfg) or math.inf):
        raise UserError(
            f"--max-new-tokens {args.max_new_tokens} leaves no room for a prompt within the "
            f"model's {cfg.max_position_embeddings} positions (max_position_embeddings); ask "
            "for fewer."
        )


def _generate(args: argparse.Namespace) -> int:
    from sparseinfer_jax.generation import generate
    from sparseinfer_jax.loading import SHIPPED_MODEL, load
    from sparseinfer_jax.streaming import TextStream

    args.model = args.model or SHIPPED_MODEL
    _check_generate_args(args)
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
        print(f"predicted sparsity per layer: {sparsity}", file=sys.stderr)
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
    import jax.numpy as jnp

    cfg = model.config
    dense = 3 * cfg.intermediate_size * cfg.hidden_size * jnp.dtype(model.dtype).itemsize
    fractions = np.asarray(result.stats.mlp_bytes_fraction)
    return float(np.sum(fractions)) * dense, dense * cfg.num_hidden_layers


def _comparison(model, sparse, dense, mode: str) -> str:
    """The few lines `--compare` prints: tokens, neurons and bytes skipped, both speeds."""
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
    ]
    if speedup < 1:
        lines.append("  note     skipping pays off where reading weights bounds a step: "
                     "`sparseinfer bench --shape 1b`")
    return "\n".join(lines)


def _model_path(args: argparse.Namespace) -> str:
    from sparseinfer_jax.loading import SHIPPED_MODEL

    return args.model or args.model_path or SHIPPED_MODEL


def _check_report_outputs(args: argparse.Namespace) -> None:
    """Fails before measuring (not after) on a `--json` / `--plot` path that cannot be written, or
    `--plot` without matplotlib."""
    for flag, out in (("--json", args.json), ("--plot", args.plot)):
        if out:
            check_output_file(out, flag)
    if args.plot:
        import importlib.util

        if importlib.util.find_spec("matplotlib") is None:
            raise UserError("--plot needs matplotlib; pip install matplotlib.")


def _check_text_args(args: argparse.Namespace) -> None:
    """Fails fast (before loading the model) on a bad text file or window sizes."""
    from sparseinfer_jax.calibration import position_limit, read_text

    read_text(args.text)
    if args.max_tokens is not None and args.max_tokens < 2:
        raise UserError(f"--max-tokens must be at least 2, got {args.max_tokens}.")
    if args.window < 2:
        raise UserError(f"--window must be at least 2, got {args.window}.")
    cfg = _peek_config(_model_path(args))
    if cfg is not None and args.window > (position_limit(cfg) or math.inf):
        raise UserError(
            f"--window {args.window} exceeds the model's {cfg.max_position_embeddings} positions "
            f"(max_position_embeddings); use --window {cfg.max_position_embeddings} or less."
        )


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


def _encode_windows(args: argparse.Namespace, tokenizer, model_path: str):
    from sparseinfer_jax.calibration import read_text, token_windows

    text = read_text(args.text)
    if tokenizer is None:
        raise UserError(f"{model_path} has no tokenizer.json, so the text cannot be encoded.")
    return token_windows(tokenizer.encode(text), args.window, args.max_tokens)


def _calibrate(args: argparse.Namespace) -> int:
    from sparseinfer_jax import checkpoint
    from sparseinfer_jax.calibration import calibrate_predictors, check_targets, format_table
    from sparseinfer_jax.config import PREDICTORS
    from sparseinfer_jax.loading import load

    check_targets(args.target_recall, args.target_sparsity, args.max_ppl_increase)
    _check_text_args(args)
    path = _model_path(args)
    if not args.dry_run and checkpoint.is_checkpoint(path):  # the alphas go there at the end
        check_writable_folder(path, "the calibrated alphas (config.json)")
    model, tokenizer = load(path, dtype=args.dtype, mode="dense", backend=args.backend)
    windows = _encode_windows(args, tokenizer, path)
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
        hf, block = checkpoint.read_checkpoint_config(path)
        block["alpha"] = cal.config_alphas()
        block["predictor"] = cal.predictor
        block["calibration"] = f"sparseinfer calibrate on {os.path.basename(args.text)}: {target}"
        checkpoint.write_checkpoint_config(path, hf, block)
        print(f"wrote alpha {alphas}, predictor {cal.predictor} to {path}/config.json")
    else:
        print(
            f"{path} is not a converted checkpoint, so nothing was written: pass --alpha {alphas}, "
            "or convert it with sparseinfer-convert and calibrate the checkpoint."
        )
    return 0


def _eval(args: argparse.Namespace) -> int:
    from sparseinfer_jax.evaluation import evaluate, format_report
    from sparseinfer_jax.loading import load

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if not modes or bad:
        raise UserError(f"--modes must be a comma list of {', '.join(MODES)}, got '{args.modes}'.")
    _check_text_args(args)
    scales = _sweep(args.sweep) if args.plot else None
    _check_report_outputs(args)
    path = _model_path(args)
    model, tokenizer = load(
        path, dtype=args.dtype, backend=args.backend, alpha=args.alpha, mesh=_mesh(args)
    )
    windows = _encode_windows(args, tokenizer, path)
    result = evaluate(model, windows, modes=modes, backend=args.backend, progress=True)
    if args.plot:
        from sparseinfer_jax.evaluation import alpha_sweep
        from sparseinfer_jax.plots import plot_report

        result["sweep"] = alpha_sweep(model, windows, scales, backend=args.backend)
        with atomic_file(args.plot) as tmp:
            plot_report(result, tmp)
    print(f"{result['tokens']} tokens in {len(windows)} windows")
    print(format_report(result))
    if args.plot:
        print(f"wrote {args.plot}")
    if args.json:
        with atomic_file(args.json) as tmp, open(tmp, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
    return 0


def _bench(args: argparse.Namespace) -> int:
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
    _check_report_outputs(args)
    def save(records: list[dict]) -> None:
        with atomic_file(args.json) as tmp, open(tmp, "w") as f:
            json.dump(records, f, indent=1)
            f.write("\n")

    records = bench.run(settings, log=lambda line: print(line, flush=True),
                        save=save if args.json else None)
    print()
    print(bench.format_bytes(records))
    kernels = bench.format_kernels(records)
    if kernels:
        print()
        print(kernels)
    if args.plot:
        with atomic_file(args.plot) as tmp:
            bench.plot(records, tmp)
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0


def _add_text_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_path", nargs="?", default=None, metavar="MODEL", help="same as --model")
    p.add_argument("--text", required=True, help="UTF-8 text file")
    p.add_argument("--max-tokens", type=int, default=None, help="use only the first N tokens")
    p.add_argument("--window", type=int, default=128, help="tokens per forward window")


def compile_cache_dir(flag_off: bool = False) -> str | None:
    """Where the CLI keeps compiled programs between runs (JAX's persistent compilation cache).

    SPARSEINFER_COMPILE_CACHE names the folder, or turns the cache off with "off" (as does
    `--no-compile-cache`); default: $XDG_CACHE_HOME/sparseinfer/jax (~/.cache/...). A folder set
    with JAX_COMPILATION_CACHE_DIR is JAX's own choice and left alone (None).
    """
    setting = os.environ.get("SPARSEINFER_COMPILE_CACHE", "").strip()
    if flag_off or setting.lower() in ("off", "0", "false", "no"):
        return None
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return None
    if setting:
        return os.path.expanduser(setting)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "sparseinfer", "jax")


def _use_compile_cache(args: argparse.Namespace) -> None:
    """Turns JAX's persistent compilation cache on: a program compiled once for a prompt/output
    bucket (tens of seconds for a 7B model on a CPU, growing with depth) loads in about a second
    in every later run."""
    folder = compile_cache_dir(args.no_compile_cache)
    if folder is None:
        return
    import jax

    jax.config.update("jax_compilation_cache_dir", folder)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparseinfer", description=__doc__)
    parser.add_argument(
        "--no-compile-cache",
        action="store_true",
        help="do not keep compiled programs between runs (default folder: ~/.cache/sparseinfer/"
        "jax; SPARSEINFER_COMPILE_CACHE=DIR or off sets it)",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate text from a prompt")
    _add_model_args(gen)
    _add_mesh_args(gen)
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
    cal.add_argument("--predictor", choices=("auto", "sign", "signmag"), default="auto",
                     help="predictor to calibrate (auto: each, keep the one reading fewer bytes)")
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
    """Entry point of `sparseinfer`; returns the exit status (2: a user error, 130: Ctrl-C)."""

    def command() -> int:
        args = build_parser().parse_args(argv)
        _use_compile_cache(args)  # compile-report turns it off again (`compile_report.command`)
        with _process_zero_prints(args):
            return args.run(args)

    return run_command(command)


if __name__ == "__main__":
    exit_process(main())
