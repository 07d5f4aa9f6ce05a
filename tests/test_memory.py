"""`memory.estimate_memory`: byte counts for known models and the arrays a model holds."""

from __future__ import annotations

import jax
import pytest
from flax import nnx

from sparseinfer_jax import config_from_hf_dict
from sparseinfer_jax.api.loading import SHIPPED_MODEL, load
from sparseinfer_jax.errors import UserError
from sparseinfer_jax.model.llama import KVCache
from sparseinfer_jax.model.memory import (
    COLAB_GPUS,
    GiB,
    estimate_memory,
    fits,
    max_context,
    parameter_count,
)

# Llama-2-7B's config.json (ReluLLaMA-7B and ProSparse-Llama-2-7B keep its shapes).
LLAMA2_7B = dict(
    architectures=["LlamaForCausalLM"],
    vocab_size=32000,
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    max_position_embeddings=4096,
    hidden_act="relu",
)


def test_llama2_7b_parameter_count_and_terms():
    cfg = config_from_hf_dict(LLAMA2_7B)
    assert parameter_count(cfg) == 6_738_415_616  # the published count
    est = estimate_memory(cfg, context=2048, dtype="bfloat16")
    assert est.weights_bytes == 2 * 6_738_415_616
    assert est.sign_bits_bytes == 32 * 11008 * 128 * 4
    assert est.kv_bytes_per_token == 2**19  # 2 (k, v) * 32 layers * 4096 * 2 bytes
    assert est.kv_cache_bytes == GiB
    assert est.total_bytes == sum(
        (est.weights_bytes, est.sign_bits_bytes, est.kv_cache_bytes, est.prefill_bytes,
         est.overhead_bytes)
    )


def test_7b_bf16_fits_l4_and_a100_not_t4_at_4k():
    cfg = config_from_hf_dict(LLAMA2_7B)
    est = estimate_memory(cfg, context=4096)
    assert not fits(est, COLAB_GPUS["T4"])
    assert fits(est, COLAB_GPUS["L4"]) and fits(est, COLAB_GPUS["A100 40GB"])
    assert 0 < max_context(cfg, COLAB_GPUS["T4"]) < max_context(cfg, COLAB_GPUS["L4"]) <= 4096 * 4


@pytest.mark.parametrize("batch,context", [(1, 64), (3, 40)])
def test_matches_the_shipped_models_arrays(batch, context):
    model, _ = load(SHIPPED_MODEL, dtype="bfloat16")
    cfg = model.config
    est = estimate_memory(cfg, batch=batch, context=context, dtype="bfloat16")
    leaves = jax.tree.leaves(nnx.state(model))
    sign_bits = sum(layer.mlp.gate_sign_bits[...].nbytes for layer in model.layers)
    alpha = model.alphas()
    held = sum(x.nbytes for x in leaves)
    assert held == est.weights_bytes + est.sign_bits_bytes + alpha.nbytes
    assert sign_bits == est.sign_bits_bytes
    cache = KVCache.zeros(cfg, batch, context, model.dtype)
    assert sum(a.nbytes for a in jax.tree.leaves(cache)) == est.kv_cache_bytes


def test_bad_arguments():
    cfg = config_from_hf_dict(LLAMA2_7B)
    with pytest.raises(UserError, match="dtype"):
        estimate_memory(cfg, dtype="int8")
    with pytest.raises(UserError, match="at least 1"):
        estimate_memory(cfg, context=0)
