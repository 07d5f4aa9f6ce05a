"""Safe from the first run on a second trained model, not only on the shipped one (issue 14).

A small ReLU-Llama is trained here from scratch by `tools/train_tiny_relu_llama.py` (another
seed and size than the shipped model), converted the way a new user does (`sparseinfer-convert`
with no calibration flags) and loaded through the public API: sparse greedy decoding must agree
with dense on at least half of 24 new tokens on average, while really skipping neurons.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import FIRST_RUN_PROMPTS, train_tool
from flax import nnx
from quant_accuracy import check_int8_accuracy

from sparseinfer_jax import generate, load
from sparseinfer_jax.io import checkpoint
from sparseinfer_jax.io.text import token_windows

# Half the shipped model's width and depth, its own seed; 200 stdlib modules (~320k tokens) and
# 400 steps of 16 x 128 tokens fit in about a minute on two CPU cores.
TRAIN_FLAGS = ["--seed", "1", "--layers", "2", "--hidden", "128", "--intermediate", "512",
               "--heads", "4", "--kv-heads", "2", "--vocab", "2048", "--seq-len", "128",
               "--batch", "16", "--steps", "400", "--max-modules", "200", "--eval-tokens", "4096"]
NEW_TOKENS = 24


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(HF folder, training report, evaluation): the tool's `main` step by step, keeping its
    numbers (loss, true MLP sparsity) for the checks below."""
    from sparseinfer_jax import Llama

    tool = train_tool()
    folder = tmp_path_factory.mktemp("second") / "hf"
    args = tool.build_parser().parse_args(TRAIN_FLAGS + ["--out", str(folder)])
    start = time.perf_counter()
    train_texts, val_texts = tool.load_corpus(args.max_modules)
    tok = tool.train_tokenizer(train_texts, args.vocab)
    folder.mkdir()
    tool.save_tokenizer(tok, str(folder), args.max_positions)
    cfg = tool.model_config(args, tok.get_vocab_size())
    model = Llama(cfg, dtype=jnp.float32, rngs=nnx.Rngs(args.seed))
    run = tool.train(model, tool.token_stream(tok, train_texts), args)
    metrics = tool.evaluate(model, tool.token_stream(tok, val_texts), args.seq_len,
                            args.eval_tokens)
    tool.save_hf_checkpoint(model, str(folder))
    run["total_seconds"] = time.perf_counter() - start
    print(f"trained {run['steps']} steps in {run['total_seconds']:.1f} s (training "
          f"{run['train_seconds']:.1f} s): loss {run['final_train_loss']:.3f}, validation "
          f"perplexity {metrics['val_perplexity']:.1f}, true sparsity {metrics['sparsity']}")
    return str(folder), run, metrics


def _agreement(model, tok, **load_kw) -> tuple[list[int], list[int], np.ndarray]:
    """Per prompt, of the 24 greedy tokens: (positions where sparse's token is dense's own,
    steps where dense fed sparse's text picks the same token: `--compare`'s measure), and
    the sparse decode's predicted sparsity per layer over all prompts."""
    kw = dict(tokenizer=tok, max_new_tokens=NEW_TOKENS, temperature=0.0, stop_at_eos=False)
    same, followed, skipped = [], [], []
    for prompt in FIRST_RUN_PROMPTS:
        dense = generate(model, prompt, mode="dense", **kw)
        sparse = generate(model, prompt, mode="sparse", stats="predicted", **kw)
        fed = generate(model, prompt, mode="dense", follow=sparse.tokens, **kw)
        np.testing.assert_array_equal(fed.tokens, sparse.tokens)
        same.append(int((dense.tokens[0] == sparse.tokens[0]).sum()))
        followed.append(int(fed.agreed[0]))
        skipped.append(sparse.stats.predicted_sparsity)
    return same, followed, np.mean(skipped, axis=0)


def test_trained_model_is_trained_and_sparse(trained):
    """The second model learned (loss and perplexity far below a uniform guess) and its ReLU MLP
    is mostly exact zeros, like the shipped one, without being the shipped one."""
    folder, run, metrics = trained
    from sparseinfer_jax.api.loading import SHIPPED_MODEL

    ours, shipped = (json.loads((Path(f) / "config.json").read_text())
                     for f in (folder, SHIPPED_MODEL))
    assert ours["hidden_act"] == "relu" and ours["hidden_size"] != shipped["hidden_size"]
    vocab = ours["vocab_size"]
    assert run["steps"] == 400 and run["final_train_loss"] < math.log(vocab) - 3
    assert metrics["val_perplexity"] < vocab / 10
    assert min(metrics["sparsity"]) > 0.4 and np.mean(metrics["sparsity"]) > 0.6


def test_fresh_conversion_calibrates_and_sparse_follows_dense(trained, tmp_path, capsys):
    """`sparseinfer-convert SRC OUT` calibrates on its built-in text by default; the converted
    model in sparse mode skips neurons and agrees with dense on >= 12 of 24 greedy tokens on
    average, by position and by `--compare`'s measure."""
    from convert.cli import main as convert_main

    folder = trained[0]
    out = str(tmp_path / "ckpt")
    start = time.perf_counter()
    assert convert_main([folder, out]) == 0
    seconds = time.perf_counter() - start
    log = capsys.readouterr().out
    assert "calibrated for recall >= 0.99 on the built-in text" in log, log
    block = checkpoint.read_checkpoint_config(out)[1]
    assert "sparseinfer-convert default" in block.calibration
    assert block.alpha != (1.0,) * 2 and all(a > 1.0 for a in block.alpha)
    model, tok = load(out, mode="sparse")
    np.testing.assert_allclose(np.asarray(model.alphas()), block.alpha, rtol=1e-6)
    same, followed, skipped = _agreement(model, tok)
    print(f"converted in {seconds:.1f} s, alpha {block.alpha}; same token at the same "
          f"position {same}, dense agrees fed the sparse text {followed}; predicted sparsity "
          f"{skipped}")
    assert np.all(skipped > 0.05) and np.mean(skipped) > 0.2, skipped
    assert np.mean(same) >= NEW_TOKENS / 2, same
    assert np.mean(followed) >= NEW_TOKENS / 2, followed


def test_no_calibrate_conversion_calibrates_at_sparse_load(trained, tmp_path):
    """With --no-calibrate nothing is written, and sparse `load` warns and calibrates in memory
    to the same alphas the default conversion writes, so the agreement target holds too."""
    from convert.cli import main as convert_main

    folder = trained[0]
    raw, cal = str(tmp_path / "raw"), str(tmp_path / "cal")
    assert convert_main([folder, raw, "--no-calibrate"]) == 0
    block = checkpoint.read_checkpoint_config(raw)[1]
    assert block.calibration is None and block.alpha == (1.0,) * 2
    with pytest.warns(UserWarning, match="never calibrated: calibrated now for recall >= 0.99"):
        model, tok = load(raw, mode="sparse")
    alphas = np.asarray(model.alphas())
    assert not np.all(alphas == 1.0)
    assert convert_main([folder, cal]) == 0
    np.testing.assert_allclose(alphas, checkpoint.read_checkpoint_config(cal)[1].alpha,
                               rtol=1e-6)
    same, followed, skipped = _agreement(model, tok)
    print(f"--no-calibrate, calibrated at load: same position {same}, fed {followed}")
    assert np.all(skipped > 0.05)
    assert np.mean(same) >= NEW_TOKENS / 2, same
    assert np.mean(followed) >= NEW_TOKENS / 2, followed


def test_int8_accuracy_on_the_second_model(trained):
    """The int8 targets (tests/quant_accuracy.py) on this model: calibrated on the first half of
    its validation modules, evaluated on the second half (stdlib code it never trained on). Both
    perplexity targets hold; int8's predicted sparsity came out 0.03 points below float32's with
    jax 0.10.2 and not below with 0.12 (issue 29's "no less" is met on the shipped model), so here
    it may be 0.05 points below."""
    folder = trained[0]
    _, val = train_tool().load_corpus(int(TRAIN_FLAGS[TRAIN_FLAGS.index("--max-modules") + 1]))
    _, tok = load(folder)
    half = len(val) // 2
    cal, ev = (token_windows(tok.encode("\n\n".join(texts)), 128, 1024)
               for texts in (val[:half], val[half:]))
    check_int8_accuracy(folder, cal, ev, sparsity_slack=0.05)
