"""TensorRT optimization profiles of an LLM engine (contract section 8), derived from the graph's inputs.

Every input's shape is declared once with symbolic dims (``llm_io``); a profile
is a (min, opt, max) value per symbol, so the shapes of all inputs, LoRA inputs
included, follow from one table per profile:

| symbol | prefill (profile 0) | decode (profile 1) |
|---|---|---|
| batch_size, rope_batch_size | 1 / BS / BS | 1 / BS / BS |
| seq_len | 1 / IL/2 / IL | 1 / 1 / 1 |
| num_tokens | 1 / 1 / 1 | 1 / 1 / 1 |
| kv_cache_start_batch_size | 0 / BS / BS | 1 / BS / BS |
| past_len, max_position_embeddings | 0 / cap / cap and cap / cap / cap | same |
| LoRA rank dims | 0 / R/2 / R | same |
"""

from __future__ import annotations

import onnx

from edgellm_steps.config import BuildLimits
from edgellm_steps.errors import EdgeLLMError

Shape = tuple[int, ...]


def symbol_ranges(limits: BuildLimits, phase: str) -> dict[str, tuple[int, int, int]]:
    """(min, opt, max) of every symbolic dim in the ``prefill`` or ``decode`` profile."""
    bs, il, cap, rank = limits.max_batch_size, limits.max_input_len, limits.max_kv_cache_capacity, limits.max_lora_rank
    prefill = phase == "prefill"
    return {
        "batch_size": (1, bs, bs),
        "rope_batch_size": (1, bs, bs),
        "seq_len": (1, max(1, il // 2), il) if prefill else (1, 1, 1),
        "num_tokens": (1, 1, 1),
        "kv_cache_start_batch_size": (0, bs, bs) if prefill else (1, bs, bs),
        "past_len": (0, cap, cap),
        "present_kv_cache_len": (0, cap, cap),
        "max_position_embeddings": (cap, cap, cap),
        "lora_rank": (0, rank // 2, rank),
    }


def _dim_range(name: str, dim: onnx.TensorShapeProto.Dimension, ranges: dict) -> tuple[int, int, int]:
    if dim.HasField("dim_value"):
        return (dim.dim_value,) * 3
    symbol = dim.dim_param
    if symbol in ranges:
        return ranges[symbol]
    if symbol.startswith("lora_rank") or symbol.endswith("_rank"):
        return ranges["lora_rank"]
    raise EdgeLLMError(f"input {name} has symbolic dim '{symbol}' that no engine profile defines")


def llm_profiles(model: onnx.ModelProto, limits: BuildLimits) -> list[dict[str, tuple[Shape, Shape, Shape]]]:
    """[prefill, decode] profiles: {input name: (min shape, opt shape, max shape)}."""
    profiles = []
    for phase in ("prefill", "decode"):
        ranges = symbol_ranges(limits, phase)
        profile = {}
        for value in model.graph.input:
            dims = [_dim_range(value.name, d, ranges) for d in value.type.tensor_type.shape.dim]
            profile[value.name] = tuple(tuple(d[i] for d in dims) for i in range(3))
        profiles.append(profile)
    return profiles
