"""`sparseinfer eval`: perplexity per mode, agreement with dense and predictor statistics."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import make_hf_checkpoint

from sparseinfer_jax.calibration import token_windows
from sparseinfer_jax.cli import main
from sparseinfer_jax.evaluation import evaluate
from sparseinfer_jax.loading import load

TEXT = "Sphinx of black quartz, judge my vow. The five boxing wizards jump quickly. " * 2


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    return make_hf_checkpoint(str(tmp_path_factory.mktemp("eval") / "hf"))


def _windows(tok, window=32):
    return token_windows(tok.encode(TEXT), window)


def test_dense_perplexity_matches_logits(hf):
    model, tok = load(hf, dtype="float32")
    windows = _windows(tok)
    assert len({w.shape[1] for w in windows}) == 2  # a shorter last window is counted too
    result = evaluate(model, windows, modes=("dense",))
    nll, count = 0.0, 0
    for ids in windows:
        logp = jax.nn.log_softmax(model(ids, mode="dense")[0].astype(jnp.float32), axis=-1)
        logp = np.asarray(logp, np.float64)
        targets = np.asarray(ids[0, 1:])
        nll -= logp[np.arange(len(targets)), targets].sum()
        count += len(targets)
    assert result["modes"]["dense"]["perplexity"] == pytest.approx(np.exp(nll / count), rel=1e-5)
    assert result["tokens"] == sum(w.shape[1] for w in windows)


def test_sparse_with_infinite_alpha_equals_dense(hf):
    model, tok = load(hf, dtype="float32", alpha=float("inf"))
    result = evaluate(model, _windows(tok), modes=("dense", "sparse", "oracle"), backend="xla")
    dense, sparse, oracle = (result["modes"][m] for m in ("dense", "sparse", "oracle"))
    assert sparse["perplexity"] == pytest.approx(dense["perplexity"], rel=1e-6)
    assert oracle["perplexity"] == pytest.approx(dense["perplexity"], rel=1e-4)
    assert sparse["top1_agreement"] == 1.0
    assert sparse["predicted_sparsity"] == 0.0 and sparse["recall"] == 1.0
    assert sparse["weight_bytes_read"] == pytest.approx(1.0 + 1.0 / 96)  # float32 sign bits
    for layer in sparse["layers"]:
        assert 0.0 < layer["true_sparsity"] < 1.0
        assert layer["precision"] == pytest.approx(1.0 - layer["true_sparsity"])


def test_eval_cli_writes_json(hf, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    out = tmp_path / "r.json"
    argv = [
        "eval",
        hf,
        "--text",
        str(text),
        "--alpha",
        "1.0",
        "--json",
        str(out),
        "--max-tokens",
        "40",
        "--backend",
        "xla",
    ]
    assert main(argv) == 0
    assert "[sparse] perplexity" in capsys.readouterr().out
    r = json.loads(out.read_text())
    sparse = r["modes"]["sparse"]
    assert r["modes"]["dense"]["perplexity"] > 1.0 and r["tokens"] == 40
    assert 0.0 <= sparse["top1_agreement"] <= 1.0 and len(sparse["layers"]) == 2
    for layer in sparse["layers"]:
        assert set(layer) == {"true_sparsity", "predicted_sparsity", "recall", "precision"}
        assert 0.0 <= layer["recall"] <= 1.0 and 0.0 <= layer["precision"] <= 1.0


def test_eval_bad_modes(tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    assert main(["eval", "--text", str(text), "--modes", "dense,fast"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--modes" in err


def test_eval_plot_writes_a_png_and_the_sweep(tmp_path, capsys):
    import json

    from sparseinfer_jax.cli import main
    from sparseinfer_jax.loading import SHIPPED_MODEL

    text = tmp_path / "t.txt"
    with open(f"{SHIPPED_MODEL}/validation.txt") as f:
        text.write_text(f.read()[:3000])
    png, report = tmp_path / "eval.png", tmp_path / "eval.json"
    argv = ["eval", "--text", str(text), "--max-tokens", "256", "--modes", "dense,sparse,oracle",
            "--backend", "xla", "--plot", str(png), "--sweep", "0.9,1,1.2", "--json", str(report)]
    assert main(argv) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    sweep = json.loads(report.read_text())["sweep"]
    assert [p["scale"] for p in sweep] == [0.9, 1.0, 1.2]
    # Smaller alpha skips more neurons: sparsity falls as the scale grows.
    sparsity = [p["predicted_sparsity"] for p in sweep]
    assert sparsity[0] >= sparsity[1] >= sparsity[2]
