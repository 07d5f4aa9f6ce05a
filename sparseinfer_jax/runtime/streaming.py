"""Printing generated text while it is produced: incremental detokenisation of one row."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TextIO

import numpy as np

# What `tokenizers` decodes an incomplete UTF-8 sequence to: the bytes of one character can
# arrive in different tokens, so a text's trailing ones wait for the next tokens.
_INCOMPLETE = "\ufffd"


class TextStream:
    """A `generate(stream=...)` callback that writes one row's new text to a file as it arrives.

    The row's tokens so far are decoded as a whole each time (byte-level and sentencepiece
    decoders merge across tokens) and only the new end of the text is written, short of an
    unfinished character at its end. Tokens after the row's first end-of-sequence token are
    ignored, so the written text equals `GenerationResult.text[row]`.
    """

    def __init__(
        self, tokenizer, file: TextIO, *, row: int = 0, eos_token_ids: Sequence[int] = ()
    ):
        self._tokenizer, self._file, self._row = tokenizer, file, row
        self._eos = frozenset(eos_token_ids)
        self._ids: list[int] = []
        self._ended = False
        self.text = ""  # what has been written

    def __call__(self, tokens: np.ndarray) -> None:
        """Takes the next new tokens `[B, k]` of the batch."""
        for t in tokens[self._row].tolist():
            if self._ended:
                break
            self._ids.append(t)
            self._ended = t in self._eos
        self._write(self._tokenizer.decode(self._ids).rstrip(_INCOMPLETE))

    def finish(self) -> None:
        """Writes what is still held back (an unfinished character stays as U+FFFD)."""
        self._write(self._tokenizer.decode(self._ids))

    def _write(self, text: str) -> None:
        new = text[len(self.text) :]
        if new:
            self._file.write(new)
            self._file.flush()
            self.text += new
