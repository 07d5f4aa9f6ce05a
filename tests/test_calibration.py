"""`sparseinfer calibrate`: per-layer alphas that meet the target, written only into config.json."""

from __future__ import annotations

import hashlib
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import FIRST_RUN_PROMPTS, make_hf_checkpoint
from flax import nnx

from convert import convert
from sparseinfer_jax.api.loading import load
from sparseinfer_jax.cli.main import main
from sparseinfer_jax.io import checkpoint
from sparseinfer_jax.io.text import token_windows
from sparseinfer_jax.model.mlp import STAT_FIELDS
from sparseinfer_jax.tuning.calibration import ALPHA_GRID, KEEP_ALL_ALPHA

TEXT = (
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs! "
    "How vexingly quick daft zebras jump; sphinx of black quartz, judge my vow. 0123456789 "
) * 3
TARGET = 0.95


def _tree_digest(folder: str) -> dict[str, str]:
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cal")
    src = make_hf_checkpoint(str(root / "hf"))
    text = root / "text.txt"
    text.write_text(TEXT)
    return src, root, str(text)


def _measured_recall(path: str, text: str, alpha=None) -> np.ndarray:
    """Recall per layer from the model's own diagnostic statistics (dense hidden states)."""
    model, tok = load(path, alpha=alpha)
    stats = np.zeros((model.config.num_hidden_layers, len(STAT_FIELDS)))

    @nnx.jit
    def forward(model, ids):
        t = ids.shape[1]
        mask = jnp.tril(jnp.ones((t, t), bool))[None]
        pos = jnp.arange(t, dtype=jnp.int32)[None]
        # The model's own predictor (the checkpoint's), run densely: its recall on dense states.
        sparsity = model.with_sparsity(mode="dense", backend="reference")
        return model.forward(ids, pos, mask, sparsity=sparsity, stats="diagnostic")

    for ids in token_windows(tok.encode(open(text).read())):
        stats += np.asarray(forward(model, ids)[2])
    return stats[:, 3] / stats[:, 2]


def test_calibrate_meets_recall_and_writes_only_alpha(setup, capsys):
    src, root, text = setup
    ckpt = convert(src, root / "ckpt", dtype="float32", calibrate=False)
    before = _tree_digest(ckpt)
    hf_before, block_before = checkpoint.read_checkpoint_config(ckpt)
    assert main(["calibrate", ckpt, "--text", text, "--target-recall", str(TARGET)]) == 0
    out = capsys.readouterr().out
    assert "recall" in out and "wrote alpha" in out
    after = _tree_digest(ckpt)
    changed = {k for k in after if after[k] != before.get(k)}
    assert changed == {"config.json"} and set(after) == set(before)
    hf_after, block_after = checkpoint.read_checkpoint_config(ckpt)
    assert hf_after == hf_before
    alphas = block_after.alpha
    # The marker says how the alphas were chosen (load in a sparse mode trusts them).
    assert "recall >= 0.95" in block_after.calibration
    assert block_after.predictor in ("sign", "signmag")  # the one reading fewer bytes
    assert block_after.replace(alpha=None, calibration=None, predictor="sign") == (
        block_before.replace(alpha=None))
    json.loads(open(os.path.join(ckpt, "config.json")).read())  # strict JSON: no Infinity
    assert len(alphas) == 2 and all(0 < a <= KEEP_ALL_ALPHA for a in alphas)
    recall = _measured_recall(ckpt, text)
    assert np.all(recall >= TARGET), (recall, alphas, out)
    # The smallest grid alpha that meets the target: one step less misses it in some layer.
    for layer, a in enumerate(alphas):
        j = int(np.argmin(np.abs(ALPHA_GRID - np.float32(min(a, np.inf)))))
        if a < KEEP_ALL_ALPHA and j > 0:
            lower = list(alphas)
            lower[layer] = float(ALPHA_GRID[j - 1])
            assert _measured_recall(ckpt, text, alpha=lower)[layer] < TARGET


def test_calibrate_sparsity_target_and_dry_run_writes_nothing(setup, capsys):
    src, root, text = setup
    ckpt = convert(src, root / "ckpt_dry", dtype="float32", calibrate=False)
    before = _tree_digest(ckpt)
    argv = ["calibrate", ckpt, "--text", text, "--target-sparsity", "0.3", "--dry-run"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "dry run" in out
    assert _tree_digest(ckpt) == before
    rows = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert len(rows) == 2 and all(float(r[2]) <= 0.3 for r in rows)


def test_calibrate_hf_folder_prints_alphas_without_writing(setup, capsys):
    src, _, text = setup
    before = _tree_digest(src)
    argv = ["calibrate", src, "--text", text, "--target-recall", "0.9", "--max-tokens", "64"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "pass --alpha" not in out and '"predictor": "' in out and "--alpha " in out
    assert _tree_digest(src) == before


def _sparse_perplexity(path: str, text: str, alpha) -> tuple[float, float]:
    from sparseinfer_jax.tuning.evaluation import evaluate

    model, tok = load(path, alpha=alpha)
    r = evaluate(model, token_windows(tok.encode(open(text).read())), modes=("dense", "sparse"))
    return r["modes"]["dense"]["perplexity"], r["modes"]["sparse"]["perplexity"]


def test_calibrate_max_ppl_increase_meets_the_budget(setup, capsys):
    src, root, text = setup
    ckpt = convert(src, root / "ckpt_ppl", dtype="float32", calibrate=False)
    chosen = {}
    for budget in ("0", "3"):
        argv = ["calibrate", ckpt, "--text", text, "--max-ppl-increase", budget, "--backend", "xla"]
        assert main(argv) == 0
        out = capsys.readouterr().out
        assert f"at most {budget}% above dense" in out and "wrote alpha" in out
        chosen[budget] = list(checkpoint.read_checkpoint_config(ckpt)[1].alpha)
        dense, sparse = _sparse_perplexity(ckpt, text, chosen[budget])
        assert sparse <= dense * (1 + float(budget) / 100) * (1 + 1e-6), (budget, chosen)
    # A looser budget only ever lowers alphas (skips more), and here it does skip more.
    assert all(a <= b for a, b in zip(chosen["3"], chosen["0"], strict=True))
    assert sum(chosen["3"]) < sum(chosen["0"]), chosen


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--max-ppl-increase", "-1"], "max-ppl-increase"),
        (["--target-recall", "0"], "target-recall"),
        (["--target-recall", "1.5"], "target-recall"),
        (["--target-sparsity", "1.0"], "target-sparsity"),
        (["--target-sparsity", "-0.1"], "target-sparsity"),
        (["--target-recall", "0.9", "--max-tokens", "1"], "max-tokens"),
    ],
)
def test_calibrate_target_out_of_range(setup, capsys, extra, match):
    _, _, text = setup
    assert main(["calibrate", "--text", text, *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and match in err


@pytest.mark.parametrize("command", ["calibrate", "eval"])
def test_missing_and_empty_text(tmp_path, capsys, command):
    extra = ["--target-recall", "0.9"] if command == "calibrate" else []
    assert main([command, "--text", str(tmp_path / "none.txt"), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "does not exist" in err
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    assert main([command, "--text", str(empty), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "empty" in err


# --- safe from the first run -------------------------------------------------------------------

FIRST_RUN_TOKENS = 24


@pytest.fixture(scope="module")
def fresh_shipped(tmp_path_factory):
    """The shipped model as a new user's HF folder: no `sparseinfer` block, never calibrated."""
    import shutil

    from sparseinfer_jax.api.loading import SHIPPED_MODEL

    folder = tmp_path_factory.mktemp("fresh") / "hf"
    shutil.copytree(SHIPPED_MODEL, folder)
    config = json.loads((folder / "config.json").read_text())
    config.pop("sparseinfer")
    (folder / "config.json").write_text(json.dumps(config))
    return str(folder)


def test_fresh_conversion_calibrates_and_sparse_follows_dense(fresh_shipped, tmp_path, capsys):
    from convert.cli import main as convert_main
    from sparseinfer_jax import generate

    out = str(tmp_path / "ckpt")
    assert convert_main([fresh_shipped, out, "--dtype", "float32"]) == 0
    stdout = capsys.readouterr().out
    assert "calibrated for recall >= 0.99" in stdout and " s: alpha " in stdout
    block = checkpoint.read_checkpoint_config(out)[1]
    assert "recall >= 0.99" in block.calibration and block.alpha != (1.0,) * 4
    model, tok = load(out, mode="sparse", backend="xla")
    kw = dict(tokenizer=tok, max_new_tokens=FIRST_RUN_TOKENS, stop_at_eos=False)
    same = []
    for prompt in FIRST_RUN_PROMPTS:
        dense = generate(model, prompt, mode="dense", **kw).tokens[0]
        sparse = generate(model, prompt, mode="sparse", **kw).tokens[0]
        same.append(int((dense == sparse).sum()))
    # Position by position, so one near-tie that flips early costs a whole prompt: judged on
    # the mean over prompts (the uncalibrated alpha 1.0 left dense at the first tokens).
    assert np.mean(same) >= FIRST_RUN_TOKENS / 2, same


def test_uncalibrated_checkpoint_calibrates_at_sparse_load_with_a_warning(fresh_shipped, tmp_path):
    from convert.cli import main as convert_main

    out = str(tmp_path / "raw")
    assert convert_main([fresh_shipped, out, "--no-calibrate"]) == 0
    block = checkpoint.read_checkpoint_config(out)[1]
    assert block.calibration is None and block.alpha == (1.0,) * 4
    model, _ = load(out, mode="dense")  # dense needs no alpha: no warning, nothing changed
    assert np.all(np.asarray(model.alphas()) == 1.0)
    with pytest.warns(UserWarning, match="never calibrated: calibrated now for recall >= 0.99"):
        model, _ = load(out, mode="sparse", backend="xla")
    assert not np.all(np.asarray(model.alphas()) == 1.0)


@pytest.mark.parametrize(
    "extra,marker",
    [(["--alpha", "2"], "alpha given to sparseinfer-convert"), ([], "calibrate")],
    ids=["alpha flag", "source calibrated"],
)
def test_chosen_alphas_are_marked_not_recalibrated(extra, marker, tmp_path, capsys):
    """--alpha, or the source's own calibrated alphas (the shipped model's), are kept."""
    from convert.cli import main as convert_main
    from sparseinfer_jax.api.loading import SHIPPED_MODEL

    out = str(tmp_path / "ckpt")
    assert convert_main([SHIPPED_MODEL, out, *extra]) == 0
    assert "calibrated for" not in capsys.readouterr().out
    block = checkpoint.read_checkpoint_config(out)[1]
    assert marker in block.calibration
    source = json.loads(open(os.path.join(SHIPPED_MODEL, "config.json")).read())["sparseinfer"]
    assert list(block.alpha) == ([2.0] * 4 if extra else source["alpha"])


@pytest.mark.parametrize("d", [32, 70, 200])
def test_votes_by_matmul_are_the_kernels_votes(d):
    """Calibration's one-matmul votes equal `pallas_kernels`' packed votes (xla) for both
    predictors, on random inputs with zeros, a width that is not a multiple of 32 and -0.0."""
    import jax

    import pallas_kernels as pk
    from sparseinfer_jax.tuning.calibration import votes_by_matmul

    rng = np.random.default_rng(d)
    gate = rng.standard_normal((96, d)).astype(np.float32)
    gate[0, :3] = [0.0, -0.0, 0.0]
    x = rng.standard_normal((40, d)).astype(np.float32) * rng.uniform(0.01, 10, (40, 1))
    x[rng.random(x.shape) < 0.2] = 0.0
    x[3] = 0.0  # a row with no votes at all
    bits = pk.pack_sign_bits(jnp.asarray(gate))
    alpha = jnp.float32(1.0)
    n_neg, totals = jax.jit(votes_by_matmul, static_argnums=2)(bits, jnp.asarray(x),
                                                               ("sign", "signmag"))
    _, sign_neg = pk.sign_predict(jnp.asarray(x), bits, alpha, backend="xla")
    _, mag_neg, mag_total = pk.signmag_predict(jnp.asarray(x), bits, alpha, backend="xla")
    np.testing.assert_array_equal(n_neg[0], sign_neg)
    np.testing.assert_array_equal(totals[0], np.count_nonzero(x, axis=-1))
    np.testing.assert_array_equal(n_neg[1], mag_neg)
    np.testing.assert_array_equal(totals[1], mag_total)
