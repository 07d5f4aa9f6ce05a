"""What the `sparseinfer` commands share: model, mesh and text arguments, checks, compile cache."""

from __future__ import annotations

import argparse
import contextlib
import glob
import os
import re
import time
import warnings

from sparseinfer_jax.errors import (
    UserError,
    check_distinct_outputs,
    check_output_file,
)
from sparseinfer_jax.model.mlp import BACKENDS, MODES


def alpha_arg(text: str) -> float | list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"alpha must be a number or a comma list, got '{text}'"
        ) from None
    return values[0] if len(values) == 1 else values


def add_model_args(p: argparse.ArgumentParser) -> None:
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
        type=alpha_arg,
        default=None,
        help="conservativeness: one number or one per layer, comma-separated "
        "(larger skips fewer neurons; default: the checkpoint's)",
    )


def add_quantize_arg(p: argparse.ArgumentParser) -> None:
    # Checked by `load` (one error line for a bad value, as for the Python API).
    p.add_argument("--quantize", default=None, metavar="int8",
                   help="quantise the linear weights as they load: int8 with one scale per row "
                   "(a checkpoint converted with --quantize is quantised already)")


def add_mesh_args(p: argparse.ArgumentParser) -> None:
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


def mesh_arg(args: argparse.Namespace):
    """The `--mesh` as a jax Mesh ("auto" without it)."""
    from sparseinfer_jax.model import sharding

    return "auto" if args.mesh is None else sharding.mesh_from_text(args.mesh)


def process_zero_prints(args: argparse.Namespace) -> contextlib.AbstractContextManager:
    """With --distributed, joins the job; then only process 0 prints (every process computes the
    same replicated results). Errors raised inside still print everywhere."""
    if not getattr(args, "distributed", False):
        return contextlib.nullcontext()
    import jax

    from sparseinfer_jax.runtime.distributed import initialize_distributed

    if not args.distributed_timeout > 0:
        raise UserError(f"--distributed-timeout must be > 0, got {args.distributed_timeout}.")
    initialize_distributed(args.distributed_timeout)
    if jax.process_index() == 0:
        return contextlib.nullcontext()
    quiet = contextlib.ExitStack()
    devnull = quiet.enter_context(open(os.devnull, "w"))
    quiet.enter_context(contextlib.redirect_stdout(devnull))
    quiet.enter_context(contextlib.redirect_stderr(devnull))
    return quiet


def check_platforms() -> None:
    """Starts JAX's backend, or raises UserError when it cannot start the platforms JAX_PLATFORMS
    names (cuda, tpu, rocm on a machine without that device): jax logs the plugin's traceback,
    then fails deep inside the first computation."""
    import logging

    import jax

    failures: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            error = record.exc_info[1] if record.exc_info else None
            failures.append(str(error) if error is not None else record.getMessage())

    log = logging.getLogger("jax._src.xla_bridge")
    keep, propagate = Keep(logging.WARNING), log.propagate
    log.addHandler(keep)
    log.propagate = False
    try:
        jax.devices()
    except (RuntimeError, AssertionError) as e:
        reason = " ".join(failures[-1:] or [str(e)]).strip().splitlines()
        reason = reason[0].split(" (set JAX_PLATFORMS")[0] if reason else type(e).__name__
        platforms = os.environ.get("JAX_PLATFORMS") or jax.config.jax_platforms
        raise UserError(f"JAX cannot start the platform JAX_PLATFORMS={platforms} names "
                        f"({reason}); unset JAX_PLATFORMS, or set it to one this machine has, "
                        "such as cpu.") from None
    finally:
        log.removeHandler(keep)
        log.propagate = propagate


def peek_config(path: str):
    """The model's LlamaConfig from its config.json alone (no weights read), so limits can be
    checked before a long load; None when it cannot be read here (`load` then says why)."""
    from sparseinfer_jax.io.source import read_hf_config
    from sparseinfer_jax.model.config import config_from_hf_dict

    try:
        return config_from_hf_dict(read_hf_config(path))
    except (UserError, OSError):
        return None


def model_path(args: argparse.Namespace) -> str:
    """The model the command runs: MODEL or --model (one of them), else the shipped model."""
    from sparseinfer_jax.api.loading import SHIPPED_MODEL

    given = [p for p in (getattr(args, "model_path", None), args.model) if p is not None]
    if any(not p.strip() for p in given):
        raise UserError("the model path is empty; name a checkpoint folder, or leave the flag "
                        "out for the shipped model.")
    if len(given) == 2 and os.path.realpath(given[0]) != os.path.realpath(given[1]):
        raise UserError(f"MODEL {given[0]} and --model {given[1]} name two models; give one.")
    return given[0] if given else SHIPPED_MODEL


def check_report_outputs(args: argparse.Namespace, inputs=()) -> None:
    """Fails before measuring (not after) on a `--json` / `--plot` path that cannot be written,
    would replace one of `inputs` or a file this tool did not write, or names the other's file;
    on `--plot` without matplotlib or in a format it cannot write."""
    check_distinct_outputs(json=args.json, plot=args.plot)
    for flag, out in (("--json", args.json), ("--plot", args.plot)):
        if out is not None:
            check_output_file(out, flag, inputs=inputs)
    if args.plot:
        import importlib.util

        if importlib.util.find_spec("matplotlib") is None:
            raise UserError("--plot needs matplotlib; pip install matplotlib.")
        from matplotlib.figure import Figure

        formats = Figure().canvas.get_supported_filetypes()
        ext = os.path.splitext(args.plot)[1].lstrip(".").lower()
        if ext and ext not in formats:
            raise UserError(f"--plot {args.plot}: matplotlib cannot write .{ext} files; use one "
                            f"of .{', .'.join(sorted(formats))}.")


def check_text_args(args: argparse.Namespace) -> None:
    """Fails fast (before loading the model) on a bad text file or window sizes."""
    from sparseinfer_jax.io.text import check_window_args, read_text

    read_text(args.text)
    check_window_args(args.window, args.max_tokens, peek_config(model_path(args)))


def encode_windows(args: argparse.Namespace, tokenizer, model_path: str):
    from sparseinfer_jax.io.text import read_text, token_windows

    text = read_text(args.text)
    if tokenizer is None:
        raise UserError(f"{model_path} has no tokenizer.json, so the text cannot be encoded; "
                        "copy the model's tokenizer.json into it.")
    return token_windows(tokenizer.encode(text), args.window, args.max_tokens)


def add_text_args(p: argparse.ArgumentParser) -> None:
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


def use_compile_cache(args: argparse.Namespace) -> None:
    """Turns JAX's persistent compilation cache on: a program compiled once for a prompt/output
    bucket (tens of seconds for a 7B model on a CPU, growing with depth) loads in about a second
    in every later run."""
    folder = compile_cache_dir(args.no_compile_cache)
    if folder is None:
        return
    import jax

    jax.config.update("jax_compilation_cache_dir", folder)
    _replace_damaged_entries(folder)


# JAX's warning for a cache entry it cannot read names the program (`jit__decode`), not the
# entry; each entry is stored as `<program>-<key>-cache` (with `-atime` beside it when evicting).
_DAMAGED = re.compile(r"Error reading persistent compilation cache entry for '([^'/]+)'")

# Seconds within which a cache entry may still be being written by another run.
_WRITING_S = 60.0


def _written_before(path: str, now: float) -> bool:
    """Whether no run can still be writing the entry: last modified `_WRITING_S` before `now`."""
    try:
        return os.path.getmtime(path) <= now - _WRITING_S
    except OSError:  # removed meanwhile
        return True


def _unreadable(path: str, now: float) -> bool:
    """Whether a cache entry no run is still writing fails to decompress as JAX reads it."""
    try:  # JAX's own reader (private); a JAX without it leaves the entries and its warning be
        from jax._src.compilation_cache import decompress_executable
    except ImportError:
        return False
    if not _written_before(path, now):
        return False
    try:
        with open(path, "rb") as f:
            decompress_executable(f.read())
    except OSError:  # removed meanwhile
        return False
    except Exception:
        return True
    return False


def _replace_damaged_entries(folder: str) -> None:
    """A run killed while JAX writes a cache entry leaves it truncated. JAX then warns, compiles
    again and keeps the damaged file (it never replaces an existing key), so every later run
    would compile again. When it warns, the program's entries that no longer decompress are
    removed before this run's compile writes them again, and the warning says so in one line.

    JAX writes an entry in place, so one that another run is writing now reads as damaged too:
    entries younger than `_WRITING_S` are left to that run, and with one of those about, JAX's
    warning is dropped (this run compiles as it would on a miss). Otherwise it shows as it is."""
    show = warnings.showwarning

    def showwarning(message, category, filename, lineno, file=None, line=None) -> None:
        found = _DAMAGED.search(str(message))
        if found:
            name, now = found.group(1), time.time()
            entries = glob.glob(os.path.join(glob.escape(folder), glob.escape(name) + "-*-cache"))
            damaged = [path for path in entries if _unreadable(path, now)]
            for path in damaged:
                for stale in (path, path[: -len("cache")] + "atime"):
                    with contextlib.suppress(OSError):
                        os.remove(stale)
            if damaged:
                message = (f"the compile cache's entry for '{name}' in {folder} could not be "
                           "read; it is compiled again and replaced")
            elif any(not _written_before(path, now) for path in entries):
                return  # another run is writing it
        show(message, category, filename, lineno, file, line)

    warnings.showwarning = showwarning
