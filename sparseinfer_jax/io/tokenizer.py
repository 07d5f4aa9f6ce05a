"""Text <-> token ids from a model folder's tokenizer files.

Two kinds of folder: a fast `tokenizer.json` (read with the `tokenizers` library), or only a
sentencepiece `tokenizer.model`, as Llama-2 derivatives such as SparseLLM/prosparse-llama-2-7b and
ReluLLaMA-7B ship (read with the `sentencepiece` library). For the latter, ids and text are those
of transformers' `LlamaTokenizer` built from the same file: transformers turns the model into a
BPE whose pre-tokenizer replaces spaces by "▁" and prepends one only when the text does not start
with a space (`legacy: false`, its default), where sentencepiece itself always prepends one; so a
leading space is dropped before sentencepiece sees the text. `tokenizer_config.json` supplies the
BOS rule in both cases.
"""

from __future__ import annotations

import os

from sparseinfer_jax.errors import UserError, check_readable
from sparseinfer_jax.io.jsonfile import read_json_object

JSON_FILE = "tokenizer.json"
SENTENCEPIECE_FILE = "tokenizer.model"


class _Fast:
    """A `tokenizer.json`."""

    def __init__(self, path: str):
        from tokenizers import Tokenizer as HFTokenizer

        check_readable(path)  # tokenizers reports an unreadable file as an invalid one
        try:
            self._tok = HFTokenizer.from_file(path)
        except Exception as e:  # tokenizers raises plain Exception for any unreadable file
            raise UserError(f"{path} is not a valid tokenizer file ({str(e)[:100]}); download it "
                            "again.") from None
        self.default_bos = None

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()


class _SentencePiece:
    """A sentencepiece `tokenizer.model`, encoded and decoded as transformers' Llama tokenizer."""

    def __init__(self, path: str, *, legacy: bool):
        try:
            import sentencepiece
        except ImportError:
            raise UserError(f"{path} is a sentencepiece tokenizer and the sentencepiece package "
                            "is not installed; pip install sentencepiece.") from None
        self._sp = sentencepiece.SentencePieceProcessor()
        check_readable(path)
        try:
            self._sp.Load(path)
        except (OSError, RuntimeError) as e:
            raise UserError(f"{path} is not a valid sentencepiece model ({str(e)[:100]}); "
                            "download it again.") from None
        self._legacy = legacy
        bos = self._sp.bos_id()
        self.default_bos = self._sp.id_to_piece(bos) if bos >= 0 else None
        # Skipped when decoding, as transformers' skip_special_tokens does.
        self._special = {i for i in range(self._sp.get_piece_size())
                         if self._sp.is_control(i) or self._sp.is_unknown(i)}

    def encode(self, text: str) -> list[int]:
        if not self._legacy and text.startswith(" "):
            text = text[1:]  # the "▁" transformers would not prepend
        return self._sp.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self._sp.decode([i for i in ids if i not in self._special])

    def token_to_id(self, token: str) -> int | None:
        i = self._sp.piece_to_id(token)
        return None if self._sp.is_unknown(i) and token != self._sp.id_to_piece(i) else i

    def vocab_size(self) -> int:
        return self._sp.get_piece_size()


def _settings(folder: str) -> dict:
    """`tokenizer_config.json` as a dict ({} when absent)."""
    path = os.path.join(folder, "tokenizer_config.json")
    if not os.path.isfile(path):
        return {}
    return read_json_object(path, missing="download it again", remedy="download it again")


class Tokenizer:
    """A folder's tokenizer (`tokenizer.json`, else `tokenizer.model`) plus the BOS rule of its
    `tokenizer_config.json`."""

    def __init__(self, folder: str):
        settings = _settings(folder)
        if os.path.isfile(os.path.join(folder, JSON_FILE)):
            self._tok = _Fast(os.path.join(folder, JSON_FILE))
        else:
            legacy = settings.get("legacy", False)
            self._tok = _SentencePiece(os.path.join(folder, SENTENCEPIECE_FILE),
                                       legacy=legacy is not False)
        bos = settings.get("bos_token", self._tok.default_bos)
        bos = bos.get("content") if isinstance(bos, dict) else bos
        self.bos_id = self._tok.token_to_id(bos) if isinstance(bos, str) else None
        # Llama tokenizers prepend BOS themselves only through this flag of the slow tokenizer.
        self._add_bos = bool(settings.get("add_bos_token", False)) and self.bos_id is not None

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, with BOS in front when the model expects it (and the
        tokenizer's own post-processor did not add it)."""
        ids = self._tok.encode(text)
        if self._add_bos and (not ids or ids[0] != self.bos_id):
            ids = [self.bos_id, *ids]
        return ids

    def decode(self, ids: list[int]) -> str:
        """Text of `ids`, special tokens dropped."""
        return self._tok.decode([int(i) for i in ids])

    @property
    def vocab_size(self) -> int:
        return self._tok.vocab_size()


def load_tokenizer(folder: str) -> Tokenizer | None:
    """The folder's tokenizer (`tokenizer.json` or a sentencepiece `tokenizer.model`), or None
    when it has neither. Damaged files raise UserError."""
    names = (JSON_FILE, SENTENCEPIECE_FILE)
    if any(os.path.isfile(os.path.join(folder, n)) for n in names):
        return Tokenizer(folder)
    return None
