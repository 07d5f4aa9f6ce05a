"""int8 end to end on the shipped model: convert --quantize int8, the checkpoint a plain orbax
reader sees, loading it and quantising at load alike, and the accuracy targets."""

from __future__ import annotations

import json
import os

import jax.numpy as jnp
import numpy as np
import orbax.checkpoint.experimental.v1 as ocp
import pytest
from flax import nnx
from quant_accuracy import check_int8_accuracy

from convert import convert
from sparseinfer_jax import load
from sparseinfer_jax.api.loading import SHIPPED_MODEL
from sparseinfer_jax.io.text import token_windows


@pytest.fixture(scope="module")
def int8_checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("int8") / "ckpt"
    return convert(SHIPPED_MODEL, out, dtype="float32", quantize="int8")


def test_checkpoint_holds_int8_rows_and_scales(int8_checkpoint):
    block = json.load(open(os.path.join(int8_checkpoint, "config.json")))["sparseinfer"]
    assert block["quantize"] == "int8" and block["dtype"] == "float32"
    # What the README shows a plain orbax reader.
    params = ocp.load(os.path.abspath(os.path.join(int8_checkpoint, "params")))
    mlp = params["layers"]["0"]["mlp"]
    gate, scale = mlp["gate"], mlp["gate_scale"]  # [F, D] int8, [F] float32
    assert gate.dtype == jnp.int8 and scale.dtype == jnp.float32
    assert scale.shape == gate.shape[:1]
    assert params["layers"]["0"]["self_attn"]["q_proj"]["weight"].dtype == jnp.int8
    assert params["embed_tokens"]["embedding"].dtype == jnp.float32
    assert mlp["gate_sign_bits"].dtype == jnp.uint32
    w = np.asarray(gate, np.float32) * np.asarray(scale)[:, None]  # the weights, dequantised
    model, _ = load(SHIPPED_MODEL, dtype="float32")
    original = np.asarray(model.layers[0].mlp.gate[...])
    assert np.all(np.abs(w - original) <= np.asarray(scale)[:, None] / 2 * (1 + 1e-5))


def test_loading_int8_equals_quantising_at_load(int8_checkpoint):
    ids = jnp.asarray([[1, 17, 300, 42, 9, 250, 3]])
    stored, _ = load(int8_checkpoint)
    at_load, _ = load(SHIPPED_MODEL, dtype="float32", quantize="int8")
    assert stored.layers[1].mlp.down_t[...].dtype == jnp.int8
    np.testing.assert_array_equal(np.asarray(stored(ids)), np.asarray(at_load(ids)))


def test_shipped_model_int8_accuracy(int8_checkpoint):
    _, tok = load(int8_checkpoint)
    texts = [open(os.path.join(SHIPPED_MODEL, f)).read()
             for f in ("calibration.txt", "validation.txt")]
    cal, val = (token_windows(tok.encode(t), 128, 1024) for t in texts)
    check_int8_accuracy(SHIPPED_MODEL, cal, val)


@pytest.mark.parametrize("mode", ["dense", "sparse"])
def test_no_weight_sized_convert_in_the_int8_generate_programs(int8_checkpoint, monkeypatch,
                                                                mode):
    """The compiled prefill and decode programs of an int8 model convert no int8 weight whole
    (inside the decode loop or hoisted out of it): blocks of 16 rows here, below every
    weight of the shipped model."""
    import jax

    from pallas_kernels import quant
    from sparseinfer_jax import generate
    from sparseinfer_jax.runtime import generation

    model, tok = load(int8_checkpoint, mode=mode)
    d = model.config.hidden_size
    monkeypatch.setattr(quant, "BLOCK_BYTES", 4 * 16 * max(d, model.config.intermediate_size))
    monkeypatch.setattr(generation, "_COMPILED", {})
    jax.clear_caches()
    generate(model, "Once upon a time", tokenizer=tok, max_new_tokens=4)
    shapes = {tuple(a.shape) for a in jax.tree.leaves(nnx.state(model)) if a.dtype == jnp.int8}
    texts = [c.as_text() for c in generation._COMPILED.values()]
    assert texts
    for text in texts:
        for line in text.splitlines():
            if " convert(" in line:
                assert not any(f"[{r},{c}]" in line for r, c in shapes), line
