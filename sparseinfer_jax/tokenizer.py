"""Text <-> token ids with the `tokenizers` library, reading a model folder's tokenizer files."""

from __future__ import annotations

import json
import os

from sparseinfer_jax.errors import UserError


class Tokenizer:
    """An HF fast tokenizer (`tokenizer.json`) plus the BOS rule of `tokenizer_config.json`."""

    def __init__(self, folder: str):
        from tokenizers import Tokenizer as HFTokenizer

        path = os.path.join(folder, "tokenizer.json")
        try:
            self._tok = HFTokenizer.from_file(path)
        except Exception as e:  # tokenizers raises plain Exception for any unreadable file
            raise UserError(f"{path} is not a valid tokenizer file ({str(e)[:100]}); download it "
                            "again.") from None
        settings = _settings(folder)
        bos = settings.get("bos_token")
        bos = bos.get("content") if isinstance(bos, dict) else bos
        self.bos_id = self._tok.token_to_id(bos) if bos else None
        # Llama tokenizers prepend BOS themselves only through this flag of the slow tokenizer.
        self._add_bos = bool(settings.get("add_bos_token", False)) and self.bos_id is not None

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, with BOS in front when the model expects it (and the
        tokenizer's own post-processor did not add it)."""
        ids = self._tok.encode(text).ids
        if self._add_bos and (not ids or ids[0] != self.bos_id):
            ids = [self.bos_id, *ids]
        return ids

    def decode(self, ids: list[int]) -> str:
        """Text of `ids`, special tokens dropped."""
        return self._tok.decode(ids, skip_special_tokens=True)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()


def _settings(folder: str) -> dict:
    """`tokenizer_config.json` as a dict ({} when absent)."""
    path = os.path.join(folder, "tokenizer_config.json")
    if not os.path.isfile(path):
        return {}
    try:
        with open(path) as f:
            settings = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError):
        settings = None
    if not isinstance(settings, dict):
        raise UserError(f"{path} is not a JSON object; download it again.")
    return settings


def load_tokenizer(folder: str) -> Tokenizer | None:
    """The folder's tokenizer, or None when it has none.

    Raises UserError for a folder with only a sentencepiece `tokenizer.model`, which `tokenizers`
    cannot read.
    """
    if os.path.isfile(os.path.join(folder, "tokenizer.json")):
        return Tokenizer(folder)
    if os.path.isfile(os.path.join(folder, "tokenizer.model")):
        raise UserError(
            f"{folder} has only tokenizer.model; save a fast tokenizer.json next to it "
            "(transformers: AutoTokenizer.from_pretrained(folder).save_pretrained(folder))."
        )
    return None
