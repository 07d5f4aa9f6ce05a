"""Text for calibration and evaluation: reading a file, token windows, the position limit."""

from __future__ import annotations

import os

import jax.numpy as jnp

from sparseinfer_jax.errors import UserError
from sparseinfer_jax.model.positions import position_limit

WINDOW = 128


def read_text(path: str | os.PathLike) -> str:
    """The text of `path`; UserError when it is missing, a folder, not UTF-8 or empty."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise UserError(f"text file {path} is a folder; give a UTF-8 text file.")
    if not os.path.isfile(path):
        raise UserError(f"text file {path} does not exist.")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise UserError(
            f"text file {path} is not UTF-8 (byte {e.object[e.start]:#04x} at offset {e.start}); "
            "convert it to UTF-8 (e.g. iconv -t UTF-8)."
        ) from None
    if not text.strip():
        raise UserError(f"text file {path} is empty.")
    return text


def token_windows(ids: list[int], window: int = WINDOW, max_tokens: int | None = None):
    """Non-overlapping windows `[1, <=window]` int32 of `ids` (first `max_tokens`); a trailing
    window of one token (nothing to predict) is dropped."""
    check_window_args(window, max_tokens)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    out = [ids[i : i + window] for i in range(0, len(ids), window)]
    out = [w for w in out if len(w) >= 2]
    if not out:
        raise UserError("the text has fewer than 2 tokens; give a longer text.")
    return [jnp.asarray([w], jnp.int32) for w in out]


def check_window_args(window: int, max_tokens: int | None, cfg=None) -> None:
    """Raises UserError for windows under 2 tokens, `max_tokens` under 2, or (given the model's
    `cfg`) a window longer than its positions; checkable before the model loads."""
    if window < 2:
        raise UserError(f"--window must be at least 2, got {window}.")
    if max_tokens is not None and max_tokens < 2:
        raise UserError(f"--max-tokens must be at least 2, got {max_tokens}.")
    limit = None if cfg is None else position_limit(cfg)
    if limit is not None and window > limit:
        raise UserError(
            f"--window {window} exceeds the model's {limit} positions "
            f"(max_position_embeddings); use --window {limit} or less."
        )


def check_windows(cfg, windows) -> None:
    """Raises UserError when a window `[1, T]` is longer than the model's positions: RoPE past
    `max_position_embeddings` gives numbers, but not the model's."""
    longest, limit = max(w.shape[1] for w in windows), position_limit(cfg)
    if limit is not None and longest > limit:
        raise UserError(
            f"a window of {longest} tokens exceeds the model's {limit} positions "
            f"(max_position_embeddings); use --window {limit} or less."
        )
