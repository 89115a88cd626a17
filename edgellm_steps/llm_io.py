"""The LLM graph's inputs and outputs, declared once (contract sections 3.1-3.2).

Names, element types and symbolic dims come from :func:`llm_inputs` and
:func:`llm_outputs`; the graph builder, the CPU reference runner and the
engine's optimization profiles all read them from here, so they cannot drift.
"""

from __future__ import annotations

from dataclasses import dataclass

from onnx import TensorProto

from edgellm_steps.checkpoint import DecoderDims


@dataclass(frozen=True)
class TensorSpec:
    name: str
    elem_type: int
    dims: tuple[int | str, ...]


def past_name(layer: int) -> str:
    return f"past_key_values_{layer}"


def present_name(layer: int) -> str:
    return f"present_key_values_{layer}"


def llm_inputs(dims: DecoderDims, kv_type: int = TensorProto.FLOAT16) -> list[TensorSpec]:
    """Graph inputs in contract order; ``kv_type`` is FLOAT8E4M3FN for an fp8 KV cache."""
    kv_dims = ("batch_size", 2, dims.num_kv_heads, "past_len", dims.head_dim)
    return [
        TensorSpec("inputs_embeds", TensorProto.FLOAT16, ("batch_size", "seq_len", dims.hidden_size)),
        *(TensorSpec(past_name(i), kv_type, kv_dims) for i in range(dims.num_layers)),
        TensorSpec(
            "rope_rotary_cos_sin",
            TensorProto.FLOAT,
            ("rope_batch_size", "max_position_embeddings", dims.rotary_dim),
        ),
        TensorSpec("context_lengths", TensorProto.INT32, ("batch_size",)),
        TensorSpec("last_token_ids", TensorProto.INT64, ("batch_size", "num_tokens")),
        TensorSpec("kvcache_start_index", TensorProto.INT32, ("kv_cache_start_batch_size",)),
    ]


def llm_outputs(dims: DecoderDims, kv_type: int = TensorProto.FLOAT16) -> list[TensorSpec]:
    kv_dims = ("batch_size", 2, dims.num_kv_heads, "present_kv_cache_len", dims.head_dim)
    return [
        TensorSpec("logits", TensorProto.FLOAT, ("batch_size", "num_tokens", dims.vocab_size)),
        *(TensorSpec(present_name(i), kv_type, kv_dims) for i in range(dims.num_layers)),
    ]
