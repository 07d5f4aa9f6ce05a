"""The benchmark's machinery: alpha fitting, byte accounting, the `bench` command. No timings."""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import pallas_kernels as pk
from sparseinfer_jax import bench
from sparseinfer_jax.cli.main import main
from sparseinfer_jax.runtime.generation import generate

# Fitted on one continuation, measured on the same decode run: the fraction moves by the few
# tokens where sparse decoding diverges from dense, and by the grid's step (1/F per neuron).
FRACTION_TOLERANCE = 0.03
# One depth and one token count everywhere (and the CLI test builds the same shape), so every test
# reuses the same compiled generate programs: compiling, not running, is what these tests pay for.
LAYERS = 2
TOKENS = 16


@pytest.fixture(scope="module")
def tiny():
    return bench.random_model(bench.shape_config("tiny", LAYERS), "float32")


def test_random_model_draws_every_matrix_and_sets_the_norms_to_one(tiny):
    """Every weight matrix is N(0, 0.02) (the attention projections and the LM head were all ones
    once: a path ending in "weight" was taken for a norm), the norms ones."""
    params = nnx.to_pure_dict(nnx.state(tiny, nnx.Param))
    for path, a in jax.tree_util.tree_flatten_with_path(params)[0]:
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        a = np.asarray(a, np.float32)
        if a.ndim == 1:
            assert (a == 1).all(), name
        else:
            assert 0.015 < a.std() < 0.025, name


def test_alpha_grid_reaches_every_count():
    d = 64
    grid = bench.alpha_grid(d)
    n_neg = np.arange(d + 1)
    tau = np.asarray(jax.vmap(lambda a: pk.threshold(a, jnp.int32(d)))(jnp.asarray(grid)))
    np.testing.assert_array_equal(tau, n_neg)  # alpha_t keeps exactly N_neg <= t


@pytest.mark.parametrize("target", [0.1, 0.3])
def test_fitted_alpha_hits_the_active_fraction(tiny, target):
    prompt = np.arange(3, 3 + bench.PROMPT_TOKENS, dtype=np.int32)[None]
    settings = bench.Settings(active=(target,), tokens=TOKENS)
    fit = bench.fitted_alphas(tiny, prompt, settings)[target]
    assert abs(fit["fitted_fraction"] - target) < FRACTION_TOLERANCE
    stats = generate(tiny, prompt, max_new_tokens=TOKENS, mode="sparse", backend="xla",
                     alpha=fit["alphas"], stop_at_eos=False, stats="predicted").stats
    assert abs(float(np.mean(stats.computed_fraction)) - target) < FRACTION_TOLERANCE


def test_step_bytes_equal_the_model_arrays(tiny):
    """Dense step bytes = every parameter array but the embedding table (one row) + the KV read."""
    cfg = tiny.config
    params = nnx.state(tiny, nnx.Param)
    arrays = jax.tree.leaves(params)
    total = sum(a.size * a.dtype.itemsize for a in arrays)
    embed = tiny.embed_tokens.embedding[...]
    context = 10
    kv = 2 * cfg.num_hidden_layers * context * cfg.num_key_value_heads * cfg.head_dim * 4
    want = total - embed.nbytes + embed.shape[1] * 4 + kv
    assert bench.step_bytes(cfg, 4, cfg.intermediate_size, context)["total"] == want
    # Sparse: the MLP's rows scale with the computed count, plus the sign bits it reads.
    sparse = bench.step_bytes(cfg, 4, 100, context)
    bits = sum(layer.mlp.gate_sign_bits[...].nbytes for layer in tiny.layers)
    rows = cfg.num_hidden_layers * cfg.hidden_size * 4
    assert sparse["gate"] == sparse["up"] == sparse["down"] == 100 * rows
    assert sparse["predictor"] == bits
    # Two-stage: up and down rows only for the candidates whose gate fires.
    fired = bench.step_bytes(cfg, 4, 100, context, fired=40)
    assert fired["gate"] == 100 * rows and fired["up"] == fired["down"] == 40 * rows
    assert sparse["total"] - fired["total"] == 2 * 60 * rows


def test_sparse_at_full_activity_decodes_like_dense(tiny):
    prompt = np.arange(5, 5 + bench.PROMPT_TOKENS, dtype=np.int32)[None]
    kw = dict(max_new_tokens=TOKENS, stop_at_eos=False, timing=False)
    dense = generate(tiny, prompt, mode="dense", **kw)
    sparse = generate(tiny, prompt, mode="sparse", backend="xla", alpha=np.inf, **kw)
    np.testing.assert_array_equal(dense.tokens, sparse.tokens)


def test_kernel_records_time_the_layer_op_against_dense(tiny):
    cfg = tiny.config
    f, d = cfg.intermediate_size, cfg.hidden_size
    records = bench.kernel_records(tiny, bench.Settings(repeats=1), "auto", 0.25, copy_gb_s=10.0)
    got = [(r["op"], r["mode"]) for r in records]
    assert got == [("gate_matvec", "dense"), ("predictor", "sparse"), ("signmag", "sparse"),
                   ("mlp", "dense"), ("sparse_mlp_layer", "sparse")]
    by = {(r["op"], r["mode"]): r for r in records}
    assert by["gate_matvec", "dense"]["bytes"] == f * d * 4
    assert by["mlp", "dense"]["bytes"] == 3 * f * d * 4
    # The op's own counts: sign bits, the candidates' gate rows, the fired ones' up and down rows.
    mlp = tiny.layers[0].mlp
    x = jnp.asarray(np.random.default_rng(0).standard_normal((1, d)), jnp.float32)
    alpha = bench.alpha_keeping(x, mlp.gate_sign_bits[...], 0.25)
    _, (_, computed, fired) = pk.sparse_mlp_layer(x, mlp.gate[...], mlp.up[...], mlp.down_t[...],
                                                  mlp.gate_sign_bits[...], alpha)
    bits = f * cfg.sign_words * 4
    want = (int(computed) + 2 * int(fired)) * d * 4 + bits
    assert by["sparse_mlp_layer", "sparse"]["bytes"] == want
    assert by["sparse_mlp_layer", "sparse"]["bytes"] < by["mlp", "dense"]["bytes"]
    for r in records:
        assert r["ms"]["median"] > 0 and r["achieved_gb_s"] > 0
    assert "speed-up" in bench.format_kernels(records)


def test_cli_writes_json_records_and_plot(tmp_path, capsys, monkeypatch):
    # The bandwidth probes stream 512 MiB each by default; a few MiB exercise the same code.
    monkeypatch.setattr(bench, "copy_bandwidth", functools.partial(bench.copy_bandwidth, 8 << 20))
    monkeypatch.setattr(bench, "read_bandwidth", functools.partial(bench.read_bandwidth, 8 << 20))
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    argv = ["bench", "--shape", "tiny", "--layers", str(LAYERS), "--tokens", str(TOKENS),
            "--repeats", "1", "--active", "0.2,1", "--no-kernels", "--json", str(out),
            "--plot", str(png)]
    assert main(argv) == 0
    records = json.loads(out.read_text())
    decode = [r for r in records if r["kind"] == "decode"]
    assert [(r["mode"], r["requested_fraction"] if r["mode"] == "sparse" else None)
            for r in decode] == [("dense", None), ("sparse", 0.2), ("sparse", 1.0)]
    for r in decode:
        for key in ("mode", "backend", "active_fraction", "tokens_per_s", "decode_ms_median",
                    "achieved_gb_s"):
            assert r[key] is not None, key
        assert r["decode_ms"]["min"] <= r["decode_ms_median"] <= r["decode_ms"]["max"]
    assert decode[-1]["active_fraction"] == 1.0
    # Each sparse record timed dense beside itself: the paired ratio is dense ms / sparse ms.
    assert "speedup" not in decode[0]
    for r in decode[1:]:
        want = r["dense_decode_ms"]["median"] / r["decode_ms_median"]  # one repeat: one pair
        assert r["speedup"]["median"] == pytest.approx(want)
    assert png.stat().st_size > 0
    assert "ms/token" in capsys.readouterr().out


@pytest.mark.parametrize("argv, match", [
    (["--shape", "70b"], "--shape must be one of"),
    (["--active", "0"], "--active"),
    (["--active", "1.5"], "--active"),
    (["--active", "x"], "--active must be a comma list"),
    (["--modes", "oracle"], "--modes"),
    (["--backend", "cuda"], "--backend"),
    (["--dtype", "float16"], "--dtype"),
    (["--layers", "0"], "--layers"),
    (["--tokens", "1"], "--tokens"),
])
def test_bad_flags_exit_2_with_one_line(argv, match, capsys):
    assert main(["bench", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and match in err and err.count("\n") == 1


def test_bytes_table_without_a_dense_record_says_dash_not_nan():
    from sparseinfer_jax.bench.report import MLP_PARTS, format_bytes

    def record(mode, scale):
        return dict(kind="decode", mode=mode, backend="xla", active_fraction=0.5,
                    bytes_per_step={p: scale * 1e6 for p in MLP_PARTS})

    both = format_bytes([record("dense", 2.0), record("sparse", 1.0)]).splitlines()
    assert both[-1].split()[-1] == f"{1 / 2:.3f}"
    alone = format_bytes([record("sparse", 1.0)]).splitlines()
    assert alone[-1].split()[-1] == "-" and "nan" not in alone[-1]
