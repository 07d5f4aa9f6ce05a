"""Folders with only a sentencepiece tokenizer.model (as Llama-2 derivatives ship): same ids and
text as transformers' Llama tokenizer, through convert and load too."""

from __future__ import annotations

import io
import json
import os
import shutil

import pytest
from conftest import make_hf_checkpoint

spm = pytest.importorskip("sentencepiece")
transformers = pytest.importorskip("transformers")

from convert import convert  # noqa: E402
from sparseinfer_jax import load  # noqa: E402
from sparseinfer_jax.io.tokenizer import Tokenizer  # noqa: E402

VOCAB = 400
CORPUS = [
    "The quick brown fox jumps over the lazy dog, again and again.",
    "Sparse inference skips the neurons a ReLU would zero: 89% of them in ProSparse.",
    "Numbers 12345 and 2024-11-29, café naïve façade, Ünïcödé — and 東京.",
    "Tabs\tand  double  spaces,\nnew lines and trailing space ",
] * 40
TEXTS = [
    "Hello world",
    "The lazy dog jumps over the quick brown fox.",
    " leading space",
    "  two leading spaces",
    "trailing space ",
    "two  spaces\nand a newline\n\nand more",
    "digits 31415926 and 2.71828",
    "東京 café naïve 🚀 (unseen characters fall back to bytes)",
    "x",
    "",
]
LLAMA_CONFIG = {"add_bos_token": True, "add_eos_token": False, "legacy": False,
                "bos_token": {"content": "<s>", "lstrip": False, "normalized": False,
                              "rstrip": False, "single_word": False, "__type": "AddedToken"},
                "eos_token": "</s>", "unk_token": "<unk>", "pad_token": None,
                "clean_up_tokenization_spaces": False, "tokenizer_class": "LlamaTokenizer"}


def train(folder: str) -> None:
    """A small BPE sentencepiece model with Llama's trainer settings (byte fallback, digits split,
    dummy prefix, no normalisation)."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS), model_writer=model, vocab_size=VOCAB, model_type="bpe",
        byte_fallback=True, split_digits=True, character_coverage=1.0, add_dummy_prefix=True,
        remove_extra_whitespaces=False, normalization_rule_name="identity",
        allow_whitespace_only_pieces=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        minloglevel=2)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "tokenizer.model"), "wb") as f:
        f.write(model.getvalue())


@pytest.fixture(scope="module")
def sp_folders(tmp_path_factory) -> dict[str, str]:
    """The same model with Llama-2's tokenizer_config.json, and with none."""
    base = str(tmp_path_factory.mktemp("sp") / "bare")
    train(base)
    llama = shutil.copytree(base, os.path.join(os.path.dirname(base), "llama"))
    with open(os.path.join(llama, "tokenizer_config.json"), "w") as f:
        json.dump(LLAMA_CONFIG, f)
    return {"bare": base, "llama": str(llama)}


@pytest.mark.parametrize("kind", ["llama", "bare"])
@pytest.mark.parametrize("cls", ["LlamaTokenizer", "LlamaTokenizerFast"])
def test_same_ids_and_text_as_transformers(sp_folders, kind, cls):
    folder = sp_folders[kind]
    theirs = getattr(transformers, cls).from_pretrained(folder)
    ours = Tokenizer(folder)
    assert ours.vocab_size == VOCAB
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == theirs(text)["input_ids"], text
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True), text
    assert ours.encode("x")[0] == (1 if kind == "llama" else ours.encode("x")[0])


def test_convert_and_load_a_sentencepiece_only_folder(sp_folders, tmp_path):
    src = make_hf_checkpoint(str(tmp_path / "hf"), vocab_size=VOCAB)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        os.remove(os.path.join(src, name))
    for name in ("tokenizer.model", "tokenizer_config.json"):
        shutil.copy(os.path.join(sp_folders["llama"], name), src)
    want = Tokenizer(sp_folders["llama"]).encode(TEXTS[1])
    out = convert(src, tmp_path / "ckpt", calibrate=False)
    assert "tokenizer.model" in os.listdir(out)
    for folder in (src, out):
        _, tokenizer = load(folder, mesh=None)
        assert tokenizer.encode(TEXTS[1]) == want and want[0] == 1
        assert tokenizer.decode(want) == TEXTS[1]


def test_damaged_sentencepiece_model_is_one_error(sp_folders, tmp_path):
    from sparseinfer_jax.errors import UserError

    folder = shutil.copytree(sp_folders["bare"], tmp_path / "sp")
    with open(folder / "tokenizer.model", "r+b") as f:
        f.truncate(100)
    with pytest.raises(UserError, match="tokenizer.model is not a valid sentencepiece model"):
        Tokenizer(str(folder))
