"""The shipped tiny ReLU-Llama (`sparseinfer_jax/models/tiny-relu-llama`) and its training tool.

The shipped model must load in transformers and in our loader with the same logits, be genuinely
trained (perplexity far below a uniform guess) and genuinely sparse (most ReLU neurons exactly
zero); the training tool must be deterministic and write folders transformers can read.
"""

from __future__ import annotations

import filecmp
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import TRAIN_TOOL, train_tool

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from sparseinfer_jax import Llama, LlamaConfig, load, model_from_params  # noqa: E402
from sparseinfer_jax.io.tokenizer import Tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FOLDER = ROOT / "sparseinfer_jax" / "models" / "tiny-relu-llama"
# float32 on both sides from the same weights; what differs is summation order.
LOGITS_RTOL = 1e-3
EXPORT_RTOL = 1e-4
WINDOWS, WINDOW = 2, 256  # the validation slice: 2 windows of 256 tokens
MAX_BYTES = 16 * 2**20
# A run small enough for a test: one narrow layer, a byte-sized vocabulary, 40 modules of text.
TINY_RUN = ["--steps", "3", "--hidden", "32", "--layers", "1", "--intermediate", "64",
            "--heads", "2", "--kv-heads", "1", "--vocab", "300", "--seq-len", "32", "--batch", "2",
            "--max-modules", "40", "--eval-tokens", "256"]

shipped = pytest.mark.skipif(not (FOLDER / "model.safetensors").is_file(),
                             reason="the tiny model has not been trained yet "
                                    "(python tools/train_tiny_relu_llama.py)")


@pytest.fixture(scope="module")
def validation_text() -> str:
    return (FOLDER / "validation.txt").read_text()


@pytest.fixture(scope="module")
def validation_ids(validation_text) -> np.ndarray:
    """`[WINDOWS, WINDOW]` token ids from the start of the held-out text."""
    ids = Tokenizer(str(FOLDER)).encode(validation_text)
    assert len(ids) >= WINDOWS * WINDOW
    return np.asarray(ids[:WINDOWS * WINDOW]).reshape(WINDOWS, WINDOW)


@pytest.fixture(scope="module")
def hf_model():
    return transformers.LlamaForCausalLM.from_pretrained(FOLDER, dtype=torch.float32).eval()


@shipped
def test_size_and_config():
    assert (FOLDER / "model.safetensors").stat().st_size <= MAX_BYTES
    cfg = transformers.AutoConfig.from_pretrained(FOLDER)
    assert cfg.hidden_act == "relu"
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (1, 2, 0)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json",
                 "TRAINING.md", "validation.txt", "calibration.txt"):
        assert (FOLDER / name).is_file(), name


@shipped
def test_tokenizer_round_trips_validation_text(validation_text):
    ours = Tokenizer(str(FOLDER))
    ids = ours.encode(validation_text)
    assert ids[0] == ours.bos_id == 1
    assert ours.decode(ids) == validation_text
    snippet = validation_text[:2000]
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(FOLDER / "tokenizer.json"))
    for theirs in (transformers.AutoTokenizer.from_pretrained(FOLDER), fast):
        assert theirs(snippet)["input_ids"] == ours.encode(snippet)
        assert theirs.decode(ours.encode(snippet), skip_special_tokens=True) == snippet


@shipped
def test_our_loader_matches_transformers(hf_model, validation_ids):
    import convert

    if not hasattr(convert, "convert_in_memory"):
        pytest.skip("convert.convert_in_memory is missing, so load() cannot read HF folders yet")
    model, tokenizer = load(FOLDER, dtype="float32")
    assert tokenizer is not None
    with torch.no_grad():
        ref = hf_model(torch.tensor(validation_ids)).logits.numpy()
    out = np.asarray(model(jnp.asarray(validation_ids)))
    assert np.abs(out - ref).max() / np.abs(ref).max() < LOGITS_RTOL


@shipped
def test_validation_perplexity_far_below_uniform(hf_model, validation_ids):
    ids = torch.tensor(validation_ids)
    with torch.no_grad():
        loss = hf_model(ids, labels=ids).loss.item()
    assert np.exp(loss) < hf_model.config.vocab_size / 10


@shipped
def test_true_mlp_sparsity_above_half_in_every_layer(hf_model, validation_ids):
    zero_fraction = {}

    def record(i):
        def hook(module, inputs, output):
            zero_fraction[i] = (output == 0).float().mean().item()
        return hook

    hooks = [layer.mlp.act_fn.register_forward_hook(record(i))
             for i, layer in enumerate(hf_model.model.layers)]
    try:
        with torch.no_grad():
            hf_model(torch.tensor(validation_ids))
    finally:
        for h in hooks:
            h.remove()
    assert len(zero_fraction) == hf_model.config.num_hidden_layers
    assert min(zero_fraction.values()) > 0.5, zero_fraction


def test_export_matches_transformers(tmp_path):
    """Our parameter layout, written under HF names, gives transformers the same logits."""
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=80, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                      tie_word_embeddings=True, bos_token_id=1, eos_token_ids=(2,),
                      pad_token_id=0)
    # Random weights wider than the init, so logits are not all near zero, and rounded to what a
    # bfloat16 file holds, so writing them loses nothing.
    rng = np.random.default_rng(0)
    shapes = nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0))),
                                        nnx.Param))
    params = jax.tree.map(lambda a: (0.2 * rng.standard_normal(a.shape)).astype(jnp.bfloat16)
                          .astype(np.float32), shapes)
    model = model_from_params(cfg, params)
    train_tool().save_hf_checkpoint(model, str(tmp_path))
    ref_model = transformers.LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = np.random.default_rng(0).integers(3, cfg.vocab_size, size=(2, 20))
    with torch.no_grad():
        ref = ref_model(torch.tensor(ids)).logits.numpy()
    out = np.asarray(model(jnp.asarray(ids)))
    assert np.abs(out - ref).max() / np.abs(ref).max() < EXPORT_RTOL


def test_training_is_deterministic_and_loads_in_transformers(tmp_path):
    outs = [tmp_path / "a", tmp_path / "b"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    runs = [subprocess.Popen([sys.executable, TRAIN_TOOL, "--out", str(out), *TINY_RUN], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for out in outs]
    for run in runs:
        log = run.communicate(timeout=300)[0]
        assert run.returncode == 0, log[-3000:]
    for name in ("model.safetensors", "tokenizer.json", "config.json", "validation.txt"):
        assert filecmp.cmp(outs[0] / name, outs[1] / name, shallow=False), name
    model = transformers.LlamaForCausalLM.from_pretrained(outs[0], dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(outs[0])
    ids = tokenizer("Return the number of items.", return_tensors="pt")["input_ids"]
    assert ids[0, 0].item() == 1
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], model.config.vocab_size)
    assert torch.isfinite(logits).all()


@shipped
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cli_defaults_write_text_without_loops(seed):
    """`sparseinfer generate`'s defaults (seeded sampling, a repetition penalty) keep the small
    model out of the loops greedy decoding falls into ("XPath,YYYYYYYY...")."""
    import re

    from sparseinfer_jax import generate
    from sparseinfer_jax.cli.main import build_parser

    args = build_parser().parse_args(["generate", "--prompt", "Return the", "--mode", "sparse"])
    assert args.temperature > 0 and args.repetition_penalty > 1  # greedy is `--temperature 0`
    model, tokenizer = load(FOLDER, mode=args.mode)
    result = generate(model, args.prompt, tokenizer=tokenizer, seed=seed,
                      max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                      top_p=args.top_p, repetition_penalty=args.repetition_penalty)
    text, tokens = result.text[0], result.tokens[0, : result.lengths[0]].tolist()
    assert max(len(m[0]) for m in re.finditer(r"(\S)\1*", text)) <= 6, text
    assert max(tokens.count(t) for t in set(tokens)) <= max(4, len(tokens) // 5), text
    words = re.findall(r"[A-Za-z]{2,}", text)
    assert len(words) >= len(tokens) // 3, text  # mostly words, not symbols
