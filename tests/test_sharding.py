"""Tensor parallelism on 4 forced CPU devices: same tokens on every mesh, sharded restore, errors.

JAX fixes its device count when it starts, so the multi-device checks run in two child processes
(this file run as a script, one per model, in parallel) with
XLA_FLAGS=--xla_force_host_platform_device_count=4; each prints its findings as JSON and the tests
below assert on them. The children compile with JAX_DISABLE_MOST_OPTIMIZATIONS (compiling is most
of their time): every mesh and the single device run under the same flags, so they still compare
like with like.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from sparseinfer_jax import UserError
from sparseinfer_jax.model.mlp import Sparsity
from sparseinfer_jax.model.sharding import make_mesh, parse_mesh

MESHES = ((1, 4), (2, 2), (4, 1))
MODES = ("dense", "sparse")
# float32 MLP: the sharded result differs from one device only in summation order.
MLP_TOL = dict(rtol=1e-5, atol=1e-5)


def _tokens(model, modes=MODES, meshes=MESHES):
    """Greedy tokens of a batch of 2 prompts of different lengths, per mesh and mode."""
    from sparseinfer_jax import generate
    from sparseinfer_jax.model.sharding import shard_model

    prompts = [[5, 6, 7], [8, 9, 10, 11, 12, 13]]
    out = {}
    for shape in (None, *meshes):
        if shape is not None:
            shard_model(model, make_mesh(*shape))
        for mode in modes:
            result = generate(
                model, prompts, max_new_tokens=10, mode=mode, stop_at_eos=False, timing=False
            )
            out[f"{shape}/{mode}"] = result.tokens.tolist()
    return out


def _random_checks(folder: str, bad_folder: str, out_dir: str) -> dict:
    import jax
    from flax import nnx
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from convert import convert
    from sparseinfer_jax import load
    from sparseinfer_jax.model.sharding import model_shardings

    model, _ = load(folder, dtype="float32")
    found = {}

    # Restore a converted checkpoint straight onto a (1, 4) mesh: every array where intended.
    ckpt = convert(folder, os.path.join(out_dir, "ckpt"), dtype="float32", calibrate=False)
    mesh = make_mesh(1, 4)
    restored, _ = load(ckpt, mesh=mesh)
    want = model_shardings(restored.config, mesh)
    got = nnx.to_pure_dict(nnx.state(restored))
    found["restore"] = {
        "/".join(str(k.key) for k in path): {
            "intended": a.sharding.is_equivalent_to(s, a.ndim),
            "shard": list(a.addressable_shards[0].data.shape),
            "global": list(a.shape),
        }
        for (path, a), s in zip(
            jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(want), strict=True
        )
    }

    # Layer 0's MLP on a (2, 2) mesh, its neurons split as in the model, against one device.
    mesh = make_mesh(2, 2)
    graphdef, state = nnx.split(model.layers[0].mlp)
    split = jax.tree.map(lambda a: NamedSharding(mesh, P("model") if a.ndim else P()), state)
    placed = jax.device_put(state, split)
    mlps = {None: nnx.merge(graphdef, state), mesh: nnx.merge(graphdef, placed)}
    # Diagnostic stats count the masks outside the op; a sparse decode step's "predicted" stats
    # take the op's own count, summed over the batch split inside it.
    cases = [(t, mode, "diagnostic") for t in (1, 3) for mode in ("dense", "sparse", "oracle")]
    cases.append((1, "sparse", "predicted"))
    xs = [np.asarray(jax.random.normal(jax.random.key(t), (2, t, 48))) for t, _, _ in cases]

    def run_all(xs, m):
        return [
            mlps[m](x, sparsity=Sparsity(mode), stats=stats, mesh=m)
            for x, (_, mode, stats) in zip(xs, cases, strict=True)
        ]

    single, sharded = (jax.jit(run_all, static_argnums=1)(xs, m) for m in (None, mesh))
    found["mlp"] = {
        f"t{t}/{mode}/{stats}": [np.asarray(v).tolist() for v in (*a, *b)]
        for (t, mode, stats), a, b in zip(cases, single, sharded, strict=True)
    }
    model, _ = load(folder, dtype="float32")
    found["tokens"] = _tokens(model)
    found["user_meshes"] = _user_meshes(folder)
    try:
        load(bad_folder, mesh=make_mesh(1, 4))
        found["error"] = None
    except UserError as e:
        found["error"] = str(e)
    found["too_big"] = None
    try:
        make_mesh(2, 4)
    except UserError as e:
        found["too_big"] = str(e)
    return found


def _user_meshes(folder: str) -> dict:
    """Meshes made the standard way (jax.make_mesh: Explicit axes on jax 0.10; one axis; axes
    swapped) through load, generate, evaluate and calibrate, beside one device."""
    import jax

    from sparseinfer_jax import generate, load
    from sparseinfer_jax.model.sharding import as_mesh
    from sparseinfer_jax.tuning.calibration import calibrate
    from sparseinfer_jax.tuning.evaluation import evaluate

    meshes = {
        "single": None,
        "make_mesh": jax.make_mesh((2, 2), ("data", "model")),
        "model_only": jax.make_mesh((4,), ("model",)),
        "data_only": jax.make_mesh((4,), ("data",)),
        "swapped": jax.make_mesh((2, 2), ("model", "data")),
    }
    window = np.random.default_rng(1).integers(3, 96, size=(1, 80)).astype(np.int32)
    out = {}
    for name, mesh in meshes.items():
        model, _ = load(folder, dtype="float32", mesh=mesh, mode="sparse")
        result = generate(model, [[5, 6, 7], [8, 9, 10, 11, 12, 13]], max_new_tokens=10,
                          stop_at_eos=False, timing=False)
        out[name] = {"tokens": result.tokens.tolist(), "mesh": dict(model.mesh.shape) if mesh
                     else None}
        if name in ("single", "make_mesh", "model_only"):
            modes = evaluate(model, [window], modes=("dense", "sparse"))["modes"]
            out[name]["perplexity"] = [modes[m]["perplexity"] for m in ("dense", "sparse")]
            out[name]["alphas"] = calibrate(model, [window], target_recall=0.9).alphas
    try:
        as_mesh(jax.make_mesh((2, 2), ("data", "x")))
        out["bad_axis"] = None
    except UserError as e:
        out["bad_axis"] = str(e)
    return out


def _shipped_checks() -> dict:
    from sparseinfer_jax import load

    # bfloat16 as shipped; its 2 KV heads are replicated on model=4 (the random model covers the
    # other meshes: each costs seconds of compiling).
    model, _ = load(mode="sparse")
    return {"tokens": _tokens(model, meshes=((1, 4),))}


def _run_child(*args: str) -> subprocess.Popen:
    env = dict(
        os.environ,
        XLA_FLAGS="--xla_force_host_platform_device_count=4",
        JAX_DISABLE_MOST_OPTIMIZATIONS="1",
        JAX_PLATFORMS="cpu",
    )
    return subprocess.Popen(
        [sys.executable, __file__, *args], env=env, stdout=subprocess.PIPE, text=True
    )


@pytest.fixture(scope="module")
def found(tmp_path_factory):
    from conftest import make_hf_checkpoint

    tmp = tmp_path_factory.mktemp("sharding")
    folder = make_hf_checkpoint(str(tmp / "hf"))
    bad = make_hf_checkpoint(str(tmp / "bad"), num_attention_heads=6)
    children = {
        "random": _run_child("random", folder, bad, str(tmp)),
        "shipped": _run_child("shipped"),
    }
    out = {}
    for name, child in children.items():
        stdout, _ = child.communicate(timeout=600)
        assert child.returncode == 0, f"{name} checks failed (stderr above)"
        out[name] = json.loads(stdout.strip().splitlines()[-1])
    return out


@pytest.mark.parametrize("model", ["random", "shipped"])
def test_every_mesh_gives_the_single_device_tokens(found, model):
    tokens = found[model]["tokens"]
    for mode in MODES:
        single = tokens[f"None/{mode}"]
        assert len(single) == 2 and len(single[0]) == 10
        for key, value in tokens.items():
            if key.endswith("/" + mode):
                assert value == single, f"{model} {key} differs from one device"
    if model == "random":  # the predictor does change the tokens: sparse mode is really sparse
        assert tokens["None/sparse"] != tokens["None/dense"]


def test_meshes_from_jax_make_mesh_and_one_axis_meshes_work(found):
    user = found["random"]["user_meshes"]
    single = user.pop("single")
    assert "'data' and 'model'" in user.pop("bad_axis")
    shapes = {"make_mesh": [2, 2], "model_only": [1, 4], "data_only": [4, 1], "swapped": [2, 2]}
    for name, got in user.items():
        assert got["tokens"] == single["tokens"], name
        assert list(got["mesh"].values()) == shapes[name] and list(got["mesh"]) == ["data", "model"]
        if "perplexity" in got:  # float32: only the summation order differs
            np.testing.assert_allclose(got["perplexity"], single["perplexity"], rtol=1e-4)
            assert got["alphas"] == single["alphas"], name


def test_restore_places_every_array_on_its_intended_sharding(found):
    restore = found["random"]["restore"]
    assert restore and all(a["intended"] for a in restore.values())
    shard = {k: a["shard"] for k, a in restore.items()}
    # TINY on model=4: 120 neurons -> 30, 4 heads x 12 -> 1 head, 2 KV heads replicated, 96 vocab.
    assert shard["layers/1/mlp/gate"] == [30, 48]
    assert shard["layers/1/mlp/down_t"] == [30, 48]
    assert shard["layers/1/mlp/gate_sign_bits"] == [30, 2]
    assert shard["layers/1/self_attn/q_proj/weight"] == [12, 48]
    assert shard["layers/1/self_attn/o_proj/weight"] == [48, 12]
    assert shard["layers/1/self_attn/k_proj/weight"] == [24, 48]
    assert shard["embed_tokens/embedding"] == [24, 48]
    assert shard["norm/weight"] == [48]


def test_sharded_mlp_psum_equals_the_single_device_mlp(found):
    for key, (y1, s1, yn, sn) in found["random"]["mlp"].items():
        np.testing.assert_allclose(np.asarray(yn), np.asarray(y1), err_msg=key, **MLP_TOL)
        assert sn == s1, key
    assert found["random"]["mlp"]["t1/sparse/diagnostic"][1][4] < 120  # decode computed a subset


def test_indivisible_heads_and_oversized_meshes_are_user_errors(found):
    error = found["random"]["error"]
    assert error and "num_attention_heads (6)" in error and "model axis (4)" in error
    assert "needs 8 devices" in found["random"]["too_big"]
    with pytest.raises(UserError, match="data=1,model=4"):
        parse_mesh("model=four")
    with pytest.raises(UserError, match="data=1,model=4"):
        parse_mesh("tensor=2")
    assert parse_mesh("model=4") == {"data": 1, "model": 4}


def test_shard_active_counts_split_the_predicted_neurons(tmp_path):
    import jax.numpy as jnp

    from sparseinfer_jax import load
    from sparseinfer_jax.model.sharding import shard_active_counts

    model, _ = load(mode="sparse")
    ids = jnp.asarray([[1, 40, 41, 42, 43, 44]])
    per_shard = shard_active_counts(model, ids, 4)
    whole = shard_active_counts(model, ids, 1)
    assert per_shard.shape == (4, 6, 4)
    np.testing.assert_array_equal(per_shard.sum(-1), whole[..., 0])
    assert 0 < whole.mean() < model.config.intermediate_size


if __name__ == "__main__":
    kind, *rest = sys.argv[1:]
    result = _random_checks(*rest) if kind == "random" else _shipped_checks()
    print(json.dumps(result))


class _Device:
    """Stands in for a jax device: only its reported memory limit matters to `auto_mesh`."""

    def __init__(self, limit):
        self.limit = limit

    def memory_stats(self):
        return None if self.limit is None else {"bytes_limit": self.limit}


def test_auto_mesh_shards_only_what_does_not_fit(monkeypatch):
    from sparseinfer_jax.bench.shapes import shape_config
    from sparseinfer_jax.model import sharding
    from sparseinfer_jax.model.memory import estimate_memory

    made = []
    monkeypatch.setattr(sharding, "make_mesh", lambda d, m, devs: made.append((d, m)) or "mesh")
    monkeypatch.setattr(sharding, "check_config", lambda cfg, mesh: None)
    cfg = shape_config("7b")
    need = estimate_memory(cfg, context=2048, dtype="bfloat16").total_bytes
    gib = 2**30
    assert 14 * gib < need < 20 * gib  # 7B in bf16 with a 2k cache
    assert sharding.auto_mesh(cfg, "bfloat16", [_Device(80 * gib)] * 4) is None  # fits one
    assert sharding.auto_mesh(cfg, "bfloat16", [_Device(None)] * 4) is None  # CPU: no limit
    assert sharding.auto_mesh(cfg, "bfloat16", [_Device(8 * gib)]) is None  # nothing to split on
    assert made == []
    assert sharding.auto_mesh(cfg, "bfloat16", [_Device(12 * gib)] * 4) == "mesh"
    assert sharding.auto_mesh(cfg, "float32", [_Device(20 * gib)] * 2) == "mesh"
    assert made == [(1, 4), (1, 2)]


def test_load_rejects_an_unknown_mesh_word():
    from sparseinfer_jax import load

    with pytest.raises(UserError, match="'auto'"):
        load(mesh="everything")
