"""The converter: HF safetensors -> our checkpoint layout, its validation, atomic output and CLI."""

from __future__ import annotations

import dataclasses
import errno
import glob
import json
import os
import shutil
import subprocess
import sys
import textwrap
import types

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from conftest import failing_save, make_hf_checkpoint, read_params
from safetensors.numpy import load_file, save_file

from convert import convert, convert_in_memory
from convert.cli import main
from pallas_kernels.pack import pack_sign_bits_numpy
from sparseinfer_jax.errors import UserError
from sparseinfer_jax.io import checkpoint, params

LAYERS = 2
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> str:
    """A float32 HF checkpoint in 20 KB shards (11 files plus the index)."""
    return make_hf_checkpoint(str(tmp_path_factory.mktemp("sharded") / "hf"), max_shard_size="20KB")


@pytest.fixture(scope="module")
def tied(tmp_path_factory) -> str:
    """A float32 HF checkpoint in one file, with tied embeddings (no lm_head.weight)."""
    return make_hf_checkpoint(str(tmp_path_factory.mktemp("tied") / "hf"), tie_word_embeddings=True)


def hf_tensors(folder: str) -> dict[str, np.ndarray]:
    return {k: v for f in glob.glob(os.path.join(folder, "*.safetensors"))
            for k, v in load_file(f).items()}


def expected_params(folder: str) -> dict:
    """The checkpoint layout, spelled out by hand from the HF tensors (independent of names.py):
    the model's own per-layer tree."""
    hf = hf_tensors(folder)

    def layer(i: int) -> dict:
        w = lambda name: hf[f"model.layers.{i}.{name}.weight"]  # noqa: E731
        return {
            "input_layernorm": {"weight": w("input_layernorm")},
            "post_attention_layernorm": {"weight": w("post_attention_layernorm")},
            "self_attn": {p: {"weight": w(f"self_attn.{p}")}
                          for p in ("q_proj", "k_proj", "v_proj", "o_proj")},
            "mlp": {"gate": w("mlp.gate_proj"), "up": w("mlp.up_proj"),
                    "down_t": w("mlp.down_proj").T,
                    "gate_sign_bits": pack_sign_bits_numpy(w("mlp.gate_proj"))},
        }

    params = {
        "embed_tokens": {"embedding": hf["model.embed_tokens.weight"]},
        "norm": {"weight": hf["model.norm.weight"]},
        "layers": {i: layer(i) for i in range(LAYERS)},
    }
    if "lm_head.weight" in hf:
        params["lm_head"] = {"weight": hf["lm_head.weight"]}
    return params


def assert_trees_equal(got, want) -> None:
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want),
                            strict=True):
        g = np.asarray(g)
        assert g.dtype == w.dtype and g.shape == w.shape, (path, g.dtype, w.dtype, g.shape, w.shape)
        np.testing.assert_array_equal(g, w, err_msg=str(path))


def leftovers(parent: str) -> list[str]:
    """Hidden temporary folders or files the atomic writer may have left next to its output."""
    return [p for p in os.listdir(parent) if p.startswith(".")]


def test_round_trip_sharded_float32(sharded, tmp_path):
    out = convert(sharded, tmp_path / "ckpt", dtype="float32", calibrate=False)
    assert out == str(tmp_path / "ckpt")
    assert checkpoint.is_checkpoint(out)
    assert_trees_equal(read_params(out), expected_params(sharded))
    hf, block = checkpoint.read_checkpoint_config(out)
    with open(os.path.join(sharded, "config.json")) as f:
        assert hf == json.load(f)
    assert block.to_json() == {"format_version": 4, "alpha": [1.0] * LAYERS, "dtype": "float32",
                               "source": sharded, "predictor": "sign"}
    for name in TOKENIZER_FILES:
        with open(os.path.join(sharded, name), "rb") as a, open(os.path.join(out, name), "rb") as b:
            assert a.read() == b.read()
    assert sorted(os.listdir(out)) == sorted(["config.json", "params", *TOKENIZER_FILES])
    assert leftovers(tmp_path) == []


def folder_bytes(path) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_free_space_check_counts_every_byte_written(sharded, tmp_path, monkeypatch, dtype):
    asked = []
    atomic = checkpoint.atomic_directory

    def spy(out, *, overwrite=False, size=0):
        asked.append(size)
        return atomic(out, overwrite=overwrite, size=size)

    monkeypatch.setattr(checkpoint, "atomic_directory", spy)
    out = convert(sharded, tmp_path / "ckpt", dtype=dtype, calibrate=False)
    assert folder_bytes(out) <= asked[0] <= folder_bytes(out) + 2**20


def test_tied_embeddings_have_no_lm_head(tied, tmp_path):
    out = convert(tied, tmp_path / "ckpt", dtype="float32", alpha=0.5)
    params = read_params(out)
    assert "lm_head" not in params
    assert_trees_equal(params, expected_params(tied))
    assert checkpoint.read_checkpoint_config(out)[1].alpha == (0.5,) * LAYERS


def test_calibrated_alpha_of_the_source_is_kept(tmp_path):
    from sparseinfer_jax.api.loading import SHIPPED_MODEL

    with open(os.path.join(SHIPPED_MODEL, "config.json")) as f:
        shipped = json.load(f)["sparseinfer"]["alpha"]
    out = convert(SHIPPED_MODEL, tmp_path / "ckpt", calibrate=False)
    assert checkpoint.read_checkpoint_config(out)[1].alpha == tuple(shipped)
    out = convert(SHIPPED_MODEL, tmp_path / "ckpt2", alpha=0.9)  # an explicit alpha wins
    assert checkpoint.read_checkpoint_config(out)[1].alpha == (0.9,) * len(shipped)


def _sparse_results(path, windows, predictor=None):
    """`evaluate` of `path` loaded in float32 sparse mode (its predictor set to `predictor` when
    given), and the predictor it decoded with."""
    from sparseinfer_jax import load
    from sparseinfer_jax.model.mlp import set_predictor
    from sparseinfer_jax.tuning.evaluation import evaluate

    model, _ = load(path, dtype="float32", mode="sparse", mesh=None)
    if predictor is not None:
        set_predictor(model, predictor)
    result = evaluate(model, windows, modes=("sparse",))["modes"]["sparse"]
    return result, model.sparsity.predictor


def test_shipped_model_decodes_the_same_after_conversion(tmp_path):
    """The shipped folder chose predictor signmag with its alphas: the converted copy keeps both
    and its marker, so its sparse perplexity and top-1 agreement are the source's."""
    from sparseinfer_jax import load
    from sparseinfer_jax.api.loading import SHIPPED_MODEL
    from sparseinfer_jax.io.text import read_text, token_windows

    with open(os.path.join(SHIPPED_MODEL, "config.json")) as f:
        source = json.load(f)["sparseinfer"]
    assert source["predictor"] == "signmag"  # the case the test is about
    out = convert(SHIPPED_MODEL, tmp_path / "ckpt", dtype="float32", calibrate=False)
    block = checkpoint.read_checkpoint_config(out)[1]
    assert {k: block.to_json()[k] for k in source} == source
    _, tokenizer = load(SHIPPED_MODEL, mesh=None)
    ids = tokenizer.encode(read_text(os.path.join(SHIPPED_MODEL, "validation.txt")))
    windows = list(token_windows(ids, 128, 512))
    want, want_kind = _sparse_results(SHIPPED_MODEL, windows)
    got, got_kind = _sparse_results(out, windows)
    assert got_kind == want_kind == "signmag"
    # Same float32 weights, same predictor and alphas: the same programs on the same numbers.
    assert got["perplexity"] == pytest.approx(want["perplexity"], rel=1e-5)
    assert got["top1_agreement"] == pytest.approx(want["top1_agreement"], abs=1e-9)
    # The sign predictor with these alphas decodes measurably differently, so a dropped
    # predictor would fail the comparison above.
    sign, _ = _sparse_results(out, windows, predictor="sign")
    assert sign["mlp_bytes_fraction"] != pytest.approx(want["mlp_bytes_fraction"], rel=1e-3)


def test_non_default_predictor_survives_conversion(tmp_path):
    """A source that chose signmag (and any other key of its block) keeps it; an explicit alpha
    keeps the predictor but replaces the calibration marker, which described other alphas."""
    from sparseinfer_jax.tuning.evaluation import window_logits

    chosen = {"alpha": [0.7] * LAYERS, "predictor": "signmag", "calibration": "by hand",
              "note": "kept"}
    src = make_hf_checkpoint(str(tmp_path / "hf"), tie_word_embeddings=True)
    with open(os.path.join(src, "config.json")) as f:
        hf = json.load(f)
    with open(os.path.join(src, "config.json"), "w") as f:
        json.dump({**hf, "sparseinfer": chosen}, f)
    out = convert(src, tmp_path / "ckpt", dtype="float32", calibrate=False)
    block = checkpoint.read_checkpoint_config(out)[1]
    assert {k: block.to_json()[k] for k in chosen} == chosen
    assert block.dtype == "float32" and block.format_version == checkpoint.FORMAT_VERSION

    from sparseinfer_jax import load

    ids = jnp.asarray(np.random.default_rng(0).integers(0, 96, (1, 24)), jnp.int32)
    logits = {}
    for name, path in (("source", src), ("converted", out)):
        model, _ = load(path, dtype="float32", mode="sparse", mesh=None)
        assert model.sparsity.predictor == "signmag"
        logits[name] = np.asarray(window_logits(model, ids, mode="sparse", backend="auto")[0])
    np.testing.assert_allclose(logits["converted"], logits["source"], rtol=1e-5, atol=1e-5)

    again = str(tmp_path / "given")
    assert main([src, again, "--alpha", "2", "--dtype", "float32"]) == 0
    block = checkpoint.read_checkpoint_config(again)[1]
    assert block.predictor == "signmag" and list(block.alpha) == [2.0] * LAYERS
    assert block.calibration == "alpha given to sparseinfer-convert"


def test_bfloat16_is_float32_cast(sharded, tmp_path):
    _, f32 = convert_in_memory(sharded, dtype="float32")
    hf, bf16 = convert_in_memory(sharded)
    assert hf["num_hidden_layers"] == LAYERS
    want = jax.tree.map(lambda a: a if a.dtype == np.uint32 else a.astype(ml_dtypes.bfloat16), f32)
    assert_trees_equal(bf16, want)
    out = convert(sharded, tmp_path / "ckpt", calibrate=False)
    assert checkpoint.read_checkpoint_config(out)[1].dtype == "bfloat16"
    assert_trees_equal(read_params(out), bf16)


@pytest.mark.parametrize("dtype", [None, "bfloat16", "float32"])
def test_load_casts_floats_but_not_sign_bits(tied, tmp_path, dtype):
    from flax import nnx

    from sparseinfer_jax import load

    out = convert(tied, tmp_path / "ckpt", dtype="float32", calibrate=False)
    model, _ = load(out, dtype=dtype, mesh=None)
    got = nnx.to_pure_dict(nnx.state(model))
    want = expected_params(tied)
    for i in range(LAYERS):
        want["layers"][i]["mlp"]["alpha"] = np.float32(1.0)
    cast = jnp.dtype(dtype or "float32")
    want = jax.tree.map(lambda a: a if a.dtype != np.float32 or a.ndim == 0 else a.astype(cast),
                        want)
    assert_trees_equal(got, want)


@pytest.mark.slow
def test_load_onto_a_mesh(tied, tmp_path):
    """Each of 4 host devices gets its slice of the MLP neurons (a fresh process for the flag)."""
    out = convert(tied, tmp_path / "ckpt", calibrate=False)
    script = textwrap.dedent(f"""
        import jax, numpy as np
        from sparseinfer_jax import load
        from sparseinfer_jax.model.sharding import make_mesh
        whole, _ = load({out!r}, mesh=None)
        split, _ = load({out!r}, mesh=make_mesh(1, 4))
        gate = split.layers[1].mlp.gate[...]
        assert len(gate.addressable_shards) == 4
        assert gate.addressable_shards[1].data.shape == (30, 48)
        ids = np.arange(3, 20)[None]
        a, b = np.asarray(whole(ids)), np.asarray(split(ids))
        assert np.abs(a - b).max() < 0.05 * np.abs(a).max()  # bf16 sums split over devices
        print("ok")
    """)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
           "JAX_PLATFORMS": "cpu"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "-c", script], env=env, cwd=root,
                            capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "ok", result.stderr[-2000:]


@pytest.mark.parametrize("calibrated", [False, True])
def test_sparseinfer_block_round_trips_every_field(tmp_path, calibrated):
    """What is written is what is read back: every field of the typed block, in the file too."""
    block = checkpoint.new_block([0.5, float(LAYERS)], "bfloat16", "org/model")
    if calibrated:
        block = block.replace(predictor="signmag", calibration="test", alpha=[3.0, 4.0])
    hf = {"model_type": "llama", "hidden_size": 8}
    checkpoint.write_checkpoint_config(tmp_path, hf, block)
    assert checkpoint.read_checkpoint_config(tmp_path) == (hf, block)
    with open(tmp_path / "config.json") as f:
        raw = json.load(f)["sparseinfer"]
    assert checkpoint.SparseInferBlock.from_json(raw, "config.json") == block
    assert set(raw) == {f.name for f in dataclasses.fields(block)
                        if f.name != "extra" and getattr(block, f.name) is not None}
    assert block.is_calibrated == calibrated


def test_checkpoint_helpers(tmp_path):
    block = checkpoint.new_block([1.0, 2.0], "float32", "src")
    (tmp_path / "params").mkdir()
    assert not checkpoint.is_checkpoint(tmp_path)  # no config.json yet
    checkpoint.write_checkpoint_config(tmp_path, {"model_type": "llama", "sparseinfer": 0}, block)
    assert checkpoint.is_checkpoint(tmp_path) and checkpoint.looks_converted(tmp_path)
    assert checkpoint.read_checkpoint_config(tmp_path) == ({"model_type": "llama"}, block)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "params"]
    for version in (1, 2, 3, 5):
        checkpoint.write_checkpoint_config(tmp_path, {}, block.replace(format_version=version))
        assert checkpoint.looks_converted(tmp_path) and not checkpoint.is_checkpoint(tmp_path)
        with pytest.raises(UserError, match="format [123] |unknown checkpoint format_version 5"):
            checkpoint.read_checkpoint_config(tmp_path)


def rewrite_single(folder: str, edit) -> None:
    path = os.path.join(folder, "model.safetensors")
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def edit_config(folder: str, **fields) -> None:
    path = os.path.join(folder, "config.json")
    with open(path) as f:
        cfg = json.load(f)
    cfg.update(fields)
    with open(path, "w") as f:
        json.dump(cfg, f)


def first_shard(folder: str) -> str:
    return sorted(glob.glob(os.path.join(folder, "model-*.safetensors")))[0]


def truncate(path: str) -> None:
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 100)


def corrupt_header(path: str) -> None:
    with open(path, "r+b") as f:
        f.seek(8)
        f.write(b"#" * 16)


BAD_INPUTS = {
    "missing tensor": ("tied", lambda d: rewrite_single(
        d, lambda t: t.pop("model.layers.1.mlp.up_proj.weight")),
        r"no tensor 'model\.layers\.1\.mlp\.up_proj\.weight'"),
    "mis-shaped tensor": ("tied", lambda d: rewrite_single(
        d, lambda t: t.update({"model.norm.weight": np.ones(47, np.float32)})),
        r"'model\.norm\.weight' .* shape \[47\] but config\.json implies \[48\]"),
    "extra tensor": ("tied", lambda d: rewrite_single(
        d, lambda t: t.update({"model.layers.0.mlp.up_proj.bias": np.ones(120, np.float32)})),
        r"unexpected tensor 'model\.layers\.0\.mlp\.up_proj\.bias'"),
    "integer tensor": ("tied", lambda d: rewrite_single(
        d, lambda t: t.update({"model.norm.weight": np.ones(48, np.int32)})),
        r"'model\.norm\.weight' .* dtype I32"),
    "truncated shard": ("sharded", lambda d: truncate(first_shard(d)),
                        r"model-00001-of-00011\.safetensors is not a readable safetensors file"),
    "corrupt header": ("sharded", lambda d: corrupt_header(first_shard(d)),
                       r"model-00001-of-00011\.safetensors is not a readable safetensors file"),
    "missing shard": ("sharded", lambda d: os.remove(first_shard(d)),
                      r"lists model-00001-of-00011\.safetensors but"),
    "no safetensors": ("tied", lambda d: os.remove(os.path.join(d, "model.safetensors")),
                       r"has no model\.safetensors"),
    "missing config": ("tied", lambda d: os.remove(os.path.join(d, "config.json")),
                       r"has no config\.json"),
    "gelu": ("tied", lambda d: edit_config(d, hidden_act="gelu"), r"'hidden_act' is 'gelu'"),
    "mlp bias": ("tied", lambda d: edit_config(d, mlp_bias=True), r"'mlp_bias' is true"),
    "gpt2": ("tied", lambda d: edit_config(d, model_type="gpt2", architectures=None),
             r"'model_type' is 'gpt2'"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_leaves_nothing(case, request, tmp_path):
    fixture, damage, message = BAD_INPUTS[case]
    src = shutil.copytree(request.getfixturevalue(fixture), tmp_path / "src")
    damage(str(src))
    before = sorted(os.listdir(src))
    with pytest.raises(UserError, match=message):
        convert(src, tmp_path / "out", calibrate=False)
    assert sorted(os.listdir(tmp_path)) == ["src"]
    assert sorted(os.listdir(src)) == before


def test_ignores_rotary_inv_freq(tied, tmp_path):
    src = shutil.copytree(tied, tmp_path / "src")
    rewrite_single(str(src), lambda t: t.update(
        {"model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(6, np.float32)}))
    assert_trees_equal(convert_in_memory(src, dtype="float32")[1], expected_params(tied))


def test_overwrite_replaces_only_a_checkpoint(tied, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    for overwrite in (False, True):
        with pytest.raises(UserError, match="is not a checkpoint written by sparseinfer-convert"):
            convert(tied, out, overwrite=overwrite, calibrate=False)
        assert os.listdir(out) == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    empty = tmp_path / "empty"
    empty.mkdir()
    # An empty folder is used as is.
    assert checkpoint.is_checkpoint(convert(tied, empty, calibrate=False))
    with pytest.raises(UserError, match="already exists; pass --overwrite"):
        convert(tied, empty, alpha=2.0)
    convert(tied, empty, overwrite=True, alpha=2.0)
    assert checkpoint.read_checkpoint_config(empty)[1].alpha == (2.0,) * LAYERS
    assert sorted(os.listdir(tmp_path)) == ["empty", "out"]


def test_failure_keeps_existing_checkpoint(tied, tmp_path, monkeypatch):
    out = convert(tied, tmp_path / "out", alpha=3.0)
    before = {p: open(p, "rb").read() for p in glob.glob(f"{out}/**", recursive=True)
              if os.path.isfile(p)}

    monkeypatch.setattr(params.ocp.partial, "save_async", failing_save(errno.ENOSPC))
    with pytest.raises(UserError, match=r"failed \(the disk is full\); nothing was written"):
        convert(tied, out, overwrite=True, calibrate=False)
    assert {p: open(p, "rb").read() for p in glob.glob(f"{out}/**", recursive=True)
            if os.path.isfile(p)} == before
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("where", ["inside", "same", "parent"])
def test_output_and_source_must_not_nest(tied, tmp_path, where):
    src = shutil.copytree(tied, tmp_path / "src")
    before = sorted(os.listdir(src))
    out = {"inside": src / "converted", "same": src, "parent": tmp_path}[where]
    with pytest.raises(UserError, match="is inside the|is not a checkpoint written"):
        convert(src, out, overwrite=True, calibrate=False)  # the case that could destroy the source
    assert sorted(os.listdir(src)) == before


@pytest.mark.parametrize("alpha, message", [([1.0], "has 1 values but the model has 2 layers"),
                                            (0.0, "positive and finite"),
                                            (float("nan"), "positive and finite")])
def test_bad_alpha(tied, tmp_path, alpha, message):
    with pytest.raises(UserError, match=message):
        convert(tied, tmp_path / "out", alpha=alpha)
    assert os.listdir(tmp_path) == []


def test_hub_id_without_huggingface_hub(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(UserError, match="huggingface_hub is not installed"):
        convert("some-org/some-model", tmp_path / "out", calibrate=False)


def test_hub_download(tied, tmp_path, monkeypatch):
    calls = []

    def snapshot_download(repo_id, allow_patterns):
        calls.append((repo_id, allow_patterns))
        if repo_id == "org/offline":
            raise ConnectionError("no network")
        return tied

    monkeypatch.setitem(sys.modules, "huggingface_hub",
                        types.SimpleNamespace(snapshot_download=snapshot_download))
    with pytest.raises(UserError, match="could not be downloaded .*ConnectionError"):
        convert("org/offline", tmp_path / "a", calibrate=False)
    out = convert("org/model", tmp_path / "b", calibrate=False)
    assert checkpoint.read_checkpoint_config(out)[1].source == "org/model"
    assert "*.safetensors" in calls[-1][1] and "tokenizer.model" in calls[-1][1]
    with pytest.raises(UserError, match="does not exist"):
        convert(str(tmp_path / "no" / "such" / "folder"), tmp_path / "c", calibrate=False)


def test_cli(tied, tmp_path, capsys):
    out = str(tmp_path / "out")
    assert main([tied, out, "--dtype", "float32", "--alpha", "2"]) == 0
    stdout = capsys.readouterr().out
    assert stdout.startswith("converted ") and "float32" in stdout and "MiB" in stdout
    assert checkpoint.read_checkpoint_config(out)[1].alpha == (2.0,) * LAYERS
    assert main([tied, out]) == 2
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [f"error: {out} already exists; pass --overwrite to "
                                         "replace it."]
    assert "Traceback" not in captured.err and captured.out == ""


def test_convert_calibrates_by_default_as_the_cli_does(tied, tmp_path, capsys):
    """The library's `convert` (the notebook's) leaves the checkpoint the CLI leaves: calibrated,
    so a sparse load needs no calibration in memory."""
    said = []
    api = convert(tied, tmp_path / "api", dtype="float32", progress=False, say=said.append)
    assert main([tied, str(tmp_path / "cli"), "--dtype", "float32"]) == 0
    blocks = [checkpoint.read_checkpoint_config(p)[1] for p in (api, tmp_path / "cli")]
    assert blocks[0].calibration.startswith("sparseinfer-convert default")
    assert blocks[0].replace(source=None) == blocks[1].replace(source=None)
    assert len(said) == 1 and said[0].startswith("calibrated for recall >= 0.99")


def test_cli_calibration_says_how_to_skip_it_and_shows_progress(tied, tmp_path, capsys):
    """The default calibration (minutes for a 7B on a CPU) is announced with the flag that skips
    it before it starts, and runs under a progress bar (tqdm: count, elapsed and time left)."""
    assert main([tied, str(tmp_path / "out"), "--dtype", "float32"]) == 0
    captured = capsys.readouterr()
    announce = captured.err.index("pass --no-calibrate to skip this step")
    bar = captured.err.index("calibrate:")
    assert announce < bar and "<" in captured.err[bar:]  # elapsed<remaining
    assert "calibrated for recall >= 0.99" in captured.out
    block = checkpoint.read_checkpoint_config(tmp_path / "out")[1]
    assert block.calibration.startswith("sparseinfer-convert default")


def test_a_dense_only_source_is_converted_and_not_calibrated(tmp_path, capsys):
    """A SiLU Llama runs dense only: convert says so and skips the calibration, which would fit
    alphas no run uses."""
    from conftest import make_hf_checkpoint

    from convert.cli import main as convert_main
    from sparseinfer_jax.io import checkpoint

    src = make_hf_checkpoint(str(tmp_path / "hf"), hidden_act="silu")
    assert convert_main([src, str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "hidden_act is 'silu': this model runs dense only, so it was not calibrated" in out
    assert "calibrated for" not in out
    assert not checkpoint.read_checkpoint_config(str(tmp_path / "out"))[1].is_calibrated
