"""Reading Hugging Face config.json: supported fields, and one clear error for the rest."""

from __future__ import annotations

import pytest

from sparseinfer_jax.errors import UserError
from sparseinfer_jax.model.config import config_from_hf_dict

BASE = dict(
    architectures=["LlamaForCausalLM"],
    model_type="llama",
    vocab_size=32,
    hidden_size=64,
    intermediate_size=100,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    hidden_act="relu",
    eos_token_id=2,
)


def test_defaults_and_derived_fields():
    cfg = config_from_hf_dict(BASE)
    assert cfg.head_dim == 16 and cfg.sign_words == 2
    assert cfg.rope.rope_type == "default" and cfg.eos_token_ids == (2,)
    assert cfg.is_relu_family


def test_rope_parameters_of_transformers_5_and_legacy_rope_scaling_agree():
    new = config_from_hf_dict(
        {**BASE, "rope_parameters": {"rope_type": "linear", "factor": 4.0, "rope_theta": 500.0}}
    )
    old = config_from_hf_dict(
        {**BASE, "rope_theta": 500.0, "rope_scaling": {"type": "linear", "factor": 4.0}}
    )
    assert new.rope == old.rope
    assert new.rope.theta == 500.0 and new.rope.factor == 4.0


def test_fatrelu_reads_prosparse_threshold():
    cfg = config_from_hf_dict({**BASE, "hidden_act": "fatrelu", "hidden_act_param": 0.01})
    assert cfg.hidden_act == "fatrelu" and cfg.act_threshold == 0.01


def test_round_trip_through_hf_dict():
    cfg = config_from_hf_dict(
        {
            **BASE,
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "original_max_position_embeddings": 64,
            },
        }
    )
    assert config_from_hf_dict(cfg.to_hf_dict()) == cfg


@pytest.mark.parametrize(
    "override, field",
    [
        ({"architectures": ["GPT2LMHeadModel"]}, "architectures"),
        ({"model_type": "mistral"}, "model_type"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"attention_bias": True}, "attention_bias"),
        ({"mlp_bias": True}, "mlp_bias"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, "rope_type"),
        ({"num_key_value_heads": 3}, "num_key_value_heads"),
        ({"hidden_size": 66}, "hidden_size"),
    ],
)
def test_unsupported_fields_are_named(override, field):
    with pytest.raises(UserError, match=field):
        config_from_hf_dict({**BASE, **override})


def test_missing_required_field_is_named():
    bad = dict(BASE)
    del bad["vocab_size"]
    with pytest.raises(UserError, match="vocab_size"):
        config_from_hf_dict(bad)
