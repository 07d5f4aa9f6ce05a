"""The JAX model against transformers' LlamaForCausalLM (torch, CPU) on tiny random checkpoints."""

from __future__ import annotations

from contextlib import nullcontext

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax.numpy as jnp  # noqa: E402

from sparseinfer_jax import generate, load  # noqa: E402

# float32 on both sides; the remaining difference is summation order (a few ulps per op).
LOGITS_RTOL = 1e-4
NEW_TOKENS = 32

CASES = {
    "gqa_untied_relu": {},
    "mha_tied": dict(num_key_value_heads=4, tie_word_embeddings=True),
    "rope_linear": dict(rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "rope_llama3": dict(
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        }
    ),
    # Sequences below run past max_position_embeddings, so the NTK base really changes.
    "rope_dynamic": dict(
        max_position_embeddings=24, rope_scaling={"rope_type": "dynamic", "factor": 2.0}
    ),
    "odd_sizes_fatrelu": dict(
        hidden_size=40,
        intermediate_size=70,
        num_attention_heads=4,
        num_key_value_heads=1,
        hidden_act="fatrelu",
    ),
    "silu_dense_only": dict(hidden_act="silu"),
}


class FATReLU(torch.nn.Module):
    """ProSparse's activation: x where x > threshold, else 0."""

    def __init__(self, threshold: float):
        super().__init__()
        self.threshold = threshold

    def forward(self, x):
        return torch.where(x > self.threshold, x, torch.zeros_like(x))


def torch_reference(folder: str):
    import json
    import os

    with open(os.path.join(folder, "config.json")) as f:
        cfg = json.load(f)
    act = cfg["hidden_act"]
    if act == "fatrelu":
        cfg["hidden_act"] = "relu"
    model = transformers.LlamaForCausalLM.from_pretrained(
        folder, config=transformers.LlamaConfig(**cfg), dtype=torch.float32
    ).eval()
    if act == "fatrelu":
        for layer in model.model.layers:
            layer.mlp.act_fn = FATReLU(cfg["hidden_act_param"])
    return model


@pytest.fixture(scope="module", params=sorted(CASES))
def pair(request, tmp_path_factory):
    from conftest import make_hf_checkpoint

    folder = make_hf_checkpoint(str(tmp_path_factory.mktemp(request.param)), **CASES[request.param])
    dense_only = CASES[request.param].get("hidden_act") == "silu"
    with pytest.warns(RuntimeWarning, match="runs dense only") if dense_only else nullcontext():
        model, tokenizer = load(folder, dtype="float32")
    return torch_reference(folder), model, tokenizer


def test_logits_match_transformers(pair):
    ref_model, model, _ = pair
    rng = np.random.default_rng(0)
    ids = rng.integers(3, model.config.vocab_size, size=(2, 30))
    with torch.no_grad():
        ref = ref_model(torch.tensor(ids)).logits.numpy()
    out = np.asarray(model(jnp.asarray(ids)))
    rel = np.abs(out - ref).max() / np.abs(ref).max()
    assert rel < LOGITS_RTOL, rel


def test_left_padded_logits_match_unpadded(pair):
    _, model, _ = pair
    ids = np.random.default_rng(1).integers(3, model.config.vocab_size, size=(1, 12))
    padded = np.concatenate([np.zeros((1, 5), ids.dtype), ids], axis=1)
    mask = np.concatenate([np.zeros((1, 5)), np.ones((1, 12))], axis=1)
    alone = np.asarray(model(jnp.asarray(ids)))
    batched = np.asarray(model(jnp.asarray(padded), jnp.asarray(mask)))[:, 5:]
    np.testing.assert_allclose(
        batched, alone, rtol=LOGITS_RTOL, atol=LOGITS_RTOL * np.abs(alone).max()
    )


def test_greedy_generation_matches_transformers_token_for_token(pair):
    ref_model, model, _ = pair
    rng = np.random.default_rng(2)
    prompts = [rng.integers(3, model.config.vocab_size, size=n).tolist() for n in (5, 11)]
    result = generate(model, prompts, max_new_tokens=NEW_TOKENS, stop_at_eos=False)
    assert result.tokens.shape == (2, NEW_TOKENS)
    for row, prompt in enumerate(prompts):
        with torch.no_grad():
            ref = ref_model.generate(
                torch.tensor([prompt]),
                max_new_tokens=NEW_TOKENS,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
            )
        np.testing.assert_array_equal(result.tokens[row], ref[0, len(prompt) :].numpy())


def test_bfloat16_checkpoint_agrees_with_float32(tmp_path):
    from conftest import make_hf_checkpoint

    from convert import convert

    folder = make_hf_checkpoint(str(tmp_path / "hf"))
    out = convert(folder, str(tmp_path / "bf16"), dtype="bfloat16", calibrate=False)
    model16, _ = load(out)
    model32, _ = load(folder, dtype="float32")
    assert model16.dtype == jnp.bfloat16
    ids = jnp.asarray(np.random.default_rng(3).integers(3, 96, size=(2, 16)))
    a, b = np.asarray(model16(ids)), np.asarray(model32(ids))
    # bf16 keeps 8 bits of mantissa: ~1e-2 relative per op, a few ops deep here.
    assert np.abs(a - b).max() / np.abs(b).max() < 5e-2
