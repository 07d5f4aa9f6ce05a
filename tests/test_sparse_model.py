"""The sparse MLP inside the model: exactness against dense, oracle, backends, one program."""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import compilation_count

import pallas_kernels as pk
from sparseinfer_jax import generate, load
from sparseinfer_jax.model.mlp import Sparsity

F32_RTOL = 1e-5


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from conftest import make_hf_checkpoint

    folder = make_hf_checkpoint(str(tmp_path_factory.mktemp("sparse")))
    return load(folder, dtype="float32")[0]


def first_mlp(model):
    """Layer 0's MLP."""
    return model.layers[0].mlp


@pytest.mark.parametrize("backend", ["reference", "xla", "pallas"])
@pytest.mark.parametrize("batch", [1, 4])
def test_sparse_mlp_equals_dense_on_the_predicted_mask(tiny, backend, batch):
    mlp = first_mlp(tiny)
    x = jax.random.normal(jax.random.key(batch), (batch, 1, tiny.config.hidden_size))
    x = x.at[0, 0, :3].set(0.0)
    for alpha in (0.5, 1.0, 3.0):
        mlp.alpha.value = jnp.float32(alpha)
        y, stats = mlp(x, sparsity=Sparsity("sparse", backend), stats="diagnostic")
        active, _ = pk.sign_predict(
            x[:, 0], mlp.gate_sign_bits[...], jnp.float32(alpha), backend="reference"
        )
        h = mlp.hidden(x[:, 0])
        expected = mlp.down(jnp.where(active[None], h, 0.0))
        np.testing.assert_allclose(y[:, 0], expected, rtol=F32_RTOL, atol=F32_RTOL)
        assert int(stats[-2]) == int(active.sum())
        # Up and down rows are read only for candidates whose gate fires for some row.
        gate = x[:, 0] @ mlp.gate[...].T
        fired = active & jnp.any(mlp.act(gate) != 0, axis=0)
        assert int(stats[-1]) == int(fired.sum())


@pytest.mark.parametrize("backend", ["xla", "pallas"])
def test_keep_everything_alpha_equals_dense(tiny, backend):
    mlp = first_mlp(tiny)
    mlp.alpha.value = jnp.float32(jnp.inf)
    x = jax.random.normal(jax.random.key(7), (2, 1, tiny.config.hidden_size))
    sparse, stats = mlp(x, sparsity=Sparsity("sparse", backend), stats="predicted")
    dense, _ = mlp(x, sparsity=Sparsity("dense"))
    np.testing.assert_allclose(sparse, dense, rtol=F32_RTOL, atol=F32_RTOL)
    assert int(stats[-2]) == tiny.config.intermediate_size
    assert int(stats[-1]) < tiny.config.intermediate_size  # ReLU: some gates never fire


def test_xla_path_equals_pallas_path(tiny):
    mlp = first_mlp(tiny)
    x = jax.random.normal(jax.random.key(3), (4, 1, tiny.config.hidden_size))
    a, _ = mlp(x, sparsity=Sparsity("sparse", "xla"))
    b, _ = mlp(x, sparsity=Sparsity("sparse", "pallas"))
    np.testing.assert_allclose(a, b, rtol=F32_RTOL, atol=F32_RTOL)


def test_oracle_logits_equal_dense(tiny):
    ids = jnp.asarray(np.random.default_rng(0).integers(3, 96, size=(2, 17)))
    dense = np.asarray(tiny(ids, mode="dense"))
    oracle = np.asarray(tiny(ids, mode="oracle"))
    np.testing.assert_allclose(oracle, dense, rtol=F32_RTOL, atol=F32_RTOL * np.abs(dense).max())


def test_sparse_generation_with_keep_everything_alpha_matches_dense(tiny):
    prompts = [[5, 9, 13], [20, 21, 22, 23, 24, 25, 26]]
    dense = generate(tiny, prompts, max_new_tokens=24, stop_at_eos=False, mode="dense")
    for backend in ("xla", "pallas"):
        sparse = generate(
            tiny,
            prompts,
            max_new_tokens=24,
            stop_at_eos=False,
            mode="sparse",
            backend=backend,
            alpha=float("inf"),
        )
        np.testing.assert_array_equal(sparse.tokens, dense.tokens)


def test_oracle_generation_matches_dense(tiny):
    prompts = [[5, 9, 13, 40]]
    dense = generate(tiny, prompts, max_new_tokens=24, stop_at_eos=False, mode="dense")
    oracle = generate(
        tiny, prompts, max_new_tokens=24, stop_at_eos=False, mode="oracle", backend="xla"
    )
    np.testing.assert_array_equal(oracle.tokens, dense.tokens)


def test_working_alpha_runs_in_one_program_and_reports_stats(tiny):
    run = functools.partial(generate, tiny, [[5, 9, 13, 40]], max_new_tokens=20,
                            stop_at_eos=False, mode="sparse", backend="xla", stats="diagnostic")
    run()
    before = compilation_count()
    results = [run(alpha=a) for a in (0.8, 1.0, 2.0)]
    assert compilation_count() == before
    sparsity = [float(r.stats.predicted_sparsity.mean()) for r in results]
    recall = [float(r.stats.recall.mean()) for r in results]
    # Larger alpha is more conservative: fewer neurons predicted zero, higher recall.
    assert sparsity[0] >= sparsity[1] >= sparsity[2]
    assert recall[0] <= recall[1] <= recall[2]
    s = results[1].stats
    assert s.true_sparsity.shape == (tiny.config.num_hidden_layers,)
    assert np.all((s.recall >= 0) & (s.recall <= 1) & (s.precision >= 0) & (s.precision <= 1))
    np.testing.assert_allclose(s.computed_fraction, 1 - s.predicted_sparsity, atol=1e-6)
    # Fired rows are candidates whose gate fired: no more than the candidates, no fewer than
    # the truly active ones the predictor kept.
    assert np.all(s.fired_fraction <= s.computed_fraction + 1e-9)
    assert np.all(s.fired_fraction >= (1 - s.true_sparsity) * s.recall - 1e-6)
    share = 4 * tiny.config.sign_words / (3 * tiny.config.hidden_size * 4)
    np.testing.assert_allclose(
        s.mlp_bytes_fraction, (s.computed_fraction + 2 * s.fired_fraction) / 3 + share, atol=1e-9
    )


@pytest.mark.parametrize("backend", ["reference", "xla", "pallas"])
def test_signmag_predictor_selects_the_computed_neurons(tiny, backend):
    mlp = first_mlp(tiny)
    x = jax.random.normal(jax.random.key(11), (3, 1, tiny.config.hidden_size))
    mlp.alpha.value = jnp.float32(1.2)
    y, stats = mlp(x, sparsity=Sparsity("sparse", backend, "signmag"), stats="predicted")
    active, _, _ = pk.signmag_predict(
        x[:, 0], mlp.gate_sign_bits[...], jnp.float32(1.2), backend="reference"
    )
    expected = mlp.down(jnp.where(active[None], mlp.hidden(x[:, 0]), 0.0))
    np.testing.assert_allclose(y[:, 0], expected, rtol=F32_RTOL, atol=F32_RTOL)
    assert int(stats[-2]) == int(active.sum()) < tiny.config.intermediate_size


@pytest.fixture(scope="module")
def on_mosaic(tmp_path_factory):
    """The tiny model in bfloat16 with the TPU kernels as its backend (Pallas' TPU interpreter
    here): its MLP weights are laid out for them at load."""
    from conftest import make_hf_checkpoint

    folder = make_hf_checkpoint(str(tmp_path_factory.mktemp("mosaic")))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # calibrated in memory, not saved
        return load(folder, dtype="bfloat16", backend="mosaic", mode="sparse")[0]


def test_the_mosaic_path_holds_the_tpu_layout_and_decodes_end_to_end(on_mosaic):
    """Decode on the TPU kernels, on weights laid out once: dense mode reads that layout as it is,
    oracle mode (the exact sparse MLP) gives dense's tokens, and a sparse decode step's logits are
    the reference path's."""
    mlp = first_mlp(on_mosaic)
    d = on_mosaic.config.hidden_size
    assert mlp.gate[...].dtype == mlp.up[...].dtype == mlp.down_t[...].dtype == jnp.uint32
    assert mlp.gate[...].shape == (on_mosaic.config.intermediate_size, -(-d // 2))
    prompt = np.arange(3, 11, dtype=np.int32)[None]
    kw = dict(max_new_tokens=3, stop_at_eos=False, timing=False)
    dense = generate(on_mosaic, prompt, mode="dense", **kw)
    oracle = generate(on_mosaic, prompt, mode="oracle", **kw)
    np.testing.assert_array_equal(oracle.tokens, dense.tokens)
    # One token per row: each row's MLP runs the per-layer op, here and on the reference path
    # (which reads the same weights re-laid back, and says so once).
    ids = jnp.asarray([[5], [17]], jnp.int32)
    got = on_mosaic(ids, mode="sparse", backend="mosaic")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        want = on_mosaic(ids, mode="sparse", backend="reference")
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                               rtol=2e-2, atol=2e-2 * float(jnp.abs(want).max()))
