"""Normalizing HF configs written by transformers 4.x and 5.x."""

import re

import pytest

from edgellm_steps.artifacts.checkpoint import decoder_dims
from edgellm_steps.errors import UnsupportedArchitectureError
from edgellm_steps.models.families import FAMILIES, family_for

BASE = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "vocab_size": 100,
    "max_position_embeddings": 256,
}


def test_transformers4_rope_fields():
    dims = decoder_dims(
        {
            **BASE,
            "rope_theta": 500000.0,
            "rope_scaling": {"type": "llama3", "factor": 8.0, "original_max_position_embeddings": 8192},
        }
    )
    assert dims.rope_theta == 500000.0
    assert dims.rope_scaling == {"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 8192}
    assert dims.num_kv_heads == 4 and dims.head_dim == 16 and dims.partial_rotary_factor == 1.0


def test_transformers5_rope_parameters():
    dims = decoder_dims({**BASE, "rope_parameters": {"rope_theta": 1e6, "rope_type": "default"}, "head_dim": None})
    assert dims.rope_theta == 1e6 and dims.rope_scaling is None and dims.head_dim == 16


def test_explicit_head_dim_and_partial_rotary():
    dims = decoder_dims({**BASE, "head_dim": 32, "partial_rotary_factor": 0.5, "num_key_value_heads": 1})
    assert dims.head_dim == 32 and dims.rotary_dim == 16 and dims.num_kv_heads == 1


@pytest.mark.parametrize("spec", FAMILIES, ids=lambda spec: spec.family)
def test_registry_finds_every_family_by_each_architecture(spec):
    for arch in spec.architectures:
        assert family_for({"architectures": ["SomethingElse", arch]}) is spec


def test_registry_lists_every_supported_architecture():
    assert family_for({"architectures": ["Qwen3ForCausalLM"]}).qk_norm
    supported = ", ".join(sorted(arch for spec in FAMILIES for arch in spec.architectures))
    with pytest.raises(UnsupportedArchitectureError, match=re.escape(f"supported: {supported}") + "$"):
        family_for({"architectures": ["GPT2LMHeadModel"]})
