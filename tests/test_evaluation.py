"""`sparseinfer eval`: perplexity per mode, agreement with dense and predictor statistics."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import make_hf_checkpoint

from sparseinfer_jax.api.loading import load
from sparseinfer_jax.cli.main import main
from sparseinfer_jax.io.text import token_windows
from sparseinfer_jax.tuning.evaluation import evaluate

TEXT = "Sphinx of black quartz, judge my vow. The five boxing wizards jump quickly. " * 2


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    return make_hf_checkpoint(str(tmp_path_factory.mktemp("eval") / "hf"))


def sign_share(model) -> float:
    """Packed float32 sign bits over the MLP: whole uint32 words per row, 3 matrices."""
    d = model.config.hidden_size
    return 4 * (-(-d // 32)) / (3 * d * 4)


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
    for layer in sparse["layers"]:
        assert 0.0 < layer["true_sparsity"] < 1.0
        # Every gate row, the truly active up and down rows, and the float32 sign bits.
        active = 1.0 - layer["true_sparsity"]
        assert layer["mlp_bytes_fraction"] == pytest.approx(
            (1 + 2 * active) / 3 + sign_share(model)
        )
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
        assert set(layer) == {
            "true_sparsity",
            "predicted_sparsity",
            "recall",
            "precision",
            "mlp_bytes_fraction",
        }
        assert 0.0 < layer["mlp_bytes_fraction"] <= 1.1
        assert 0.0 <= layer["recall"] <= 1.0 and 0.0 <= layer["precision"] <= 1.0


def test_eval_bad_modes(tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    assert main(["eval", "--text", str(text), "--modes", "dense,fast"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--modes" in err


def test_eval_plot_writes_a_png_and_the_sweep(tmp_path, capsys):
    import json

    from sparseinfer_jax.api.loading import SHIPPED_MODEL
    from sparseinfer_jax.cli.main import main

    text = tmp_path / "t.txt"
    with open(f"{SHIPPED_MODEL}/validation.txt") as f:
        text.write_text(f.read()[:3000])
    png, report = tmp_path / "eval.png", tmp_path / "eval.json"
    argv = [
        "eval",
        "--text",
        str(text),
        "--max-tokens",
        "256",
        "--modes",
        "dense,sparse,oracle",
        "--backend",
        "xla",
        "--plot",
        str(png),
        "--sweep",
        "0.9,1,1.2",
        "--json",
        str(report),
    ]
    assert main(argv) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    sweep = json.loads(report.read_text())["sweep"]
    assert [p["scale"] for p in sweep] == [0.9, 1.0, 1.2]
    # Smaller alpha skips more neurons: sparsity falls as the scale grows.
    sparsity = [p["predicted_sparsity"] for p in sweep]
    assert sparsity[0] >= sparsity[1] >= sparsity[2]


def _numpy_predictor(x: np.ndarray, w_gate: np.ndarray, alpha: float) -> np.ndarray:
    """The paper's rule from raw weights: `x: [T, D]`, `w_gate: [F, D]` -> active `[T, F]`.

    A product x_j * w_ij is negative when exactly one sign is negative; zero inputs never vote.
    Predicted zero iff N_neg > alpha * N_pos (float32, as documented).
    """
    nz = x != 0
    neg = ((x[:, None, :] < 0) != (w_gate[None] < 0)) & nz[:, None, :]
    n_neg = neg.sum(-1).astype(np.float32)
    n_pos = nz.sum(-1, keepdims=True).astype(np.float32) - n_neg
    return ~(n_neg > np.float32(alpha) * n_pos)


def test_sparse_figures_equal_numpy_from_weights(hf):
    """Perplexity, top-1 agreement and every per-layer predictor figure of `evaluate`, recomputed
    with the transformers model whose MLPs apply a numpy predictor to the raw HF weights."""
    import torch
    from transformers import LlamaForCausalLM

    alpha = 1.1
    model, tok = load(hf, dtype="float32", alpha=alpha)
    windows = _windows(tok)
    result = evaluate(model, windows, modes=("dense", "sparse"), backend="xla")

    ref = LlamaForCausalLM.from_pretrained(hf, torch_dtype=torch.float32).eval()
    layers = len(ref.model.layers)
    f = ref.config.intermediate_size
    counts = np.zeros((layers, 4))  # rows, predicted, true, both
    sparse_on = [False]

    def patched(mlp, i):
        def forward(x):
            g, u = mlp.gate_proj(x), mlp.up_proj(x)
            h = torch.relu(g) * u
            if sparse_on[0]:
                rows = x.detach().reshape(-1, x.shape[-1]).numpy()
                pred = _numpy_predictor(rows, mlp.gate_proj.weight.detach().numpy(), alpha)
                true = h.detach().reshape(-1, f).numpy() != 0
                counts[i] += [len(rows), pred.sum(), true.sum(), (pred & true).sum()]
                h = h * torch.from_numpy(pred.reshape(h.shape).astype(np.float32))
            return mlp.down_proj(h)

        return forward

    for i, layer in enumerate(ref.model.layers):
        layer.mlp.forward = patched(layer.mlp, i)

    nll = {"dense": 0.0, "sparse": 0.0}
    agree = positions = 0
    for ids in windows:
        ids_t = torch.from_numpy(np.asarray(ids, np.int64))
        top1 = {}
        for m in ("dense", "sparse"):
            sparse_on[0] = m == "sparse"
            with torch.no_grad():
                logits = ref(ids_t).logits[0].double().numpy()
            logp = logits - logits.max(-1, keepdims=True)
            logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
            targets = np.asarray(ids[0, 1:])
            nll[m] -= logp[np.arange(len(targets)), targets].sum()
            top1[m] = logits.argmax(-1)
        agree += int((top1["dense"] == top1["sparse"]).sum())
        positions += len(top1["dense"])
    count = sum(w.shape[1] - 1 for w in windows)

    sparse = result["modes"]["sparse"]
    for m in ("dense", "sparse"):
        assert result["modes"][m]["perplexity"] == pytest.approx(np.exp(nll[m] / count), rel=1e-4)
    assert sparse["top1_agreement"] == pytest.approx(agree / positions)
    rows, pred, true, both = counts.T
    assert 0.05 < (1 - pred.sum() / (rows.sum() * f)) < 0.95  # the case is not degenerate
    for li, layer in enumerate(sparse["layers"]):
        # Exact counts; a pre-activation within rounding of 0 could flip one neuron.
        tol = 2.0 / (rows[li] * f)
        assert layer["true_sparsity"] == pytest.approx(1 - true[li] / (rows[li] * f), abs=tol)
        assert layer["predicted_sparsity"] == pytest.approx(1 - pred[li] / (rows[li] * f), abs=tol)
        assert layer["recall"] == pytest.approx(both[li] / true[li], abs=2.0 / true[li])
        assert layer["precision"] == pytest.approx(both[li] / pred[li], abs=2.0 / pred[li])
    mean_pred = float(np.mean(1 - pred / (rows * f)))
    assert sparse["predicted_sparsity"] == pytest.approx(mean_pred, abs=1e-3)
    bytes_per_layer = ((pred + 2 * both) / (3 * rows * f)) + sign_share(model)
    for li, layer in enumerate(sparse["layers"]):
        assert layer["mlp_bytes_fraction"] == pytest.approx(bytes_per_layer[li], abs=2.0 / f)
    assert sparse["mlp_bytes_fraction"] == pytest.approx(bytes_per_layer.mean(), abs=2.0 / f)
