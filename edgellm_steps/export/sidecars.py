"""Sidecar files of an LLM export directory (contract section 4)."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgellm_steps import EDGELLM_VERSION
from edgellm_steps.artifacts.checkpoint import DecoderDims, TensorStore
from edgellm_steps.artifacts.safetensors_io import write_single_tensor
from edgellm_steps.graph.weight_streams import CHUNK_ELEMENTS
from edgellm_steps.models.families import FamilySpec


def runtime_config(
    dims: DecoderDims, spec: FamilySpec, hf_config: dict[str, Any], *, eagle_base: bool = False
) -> dict[str, Any]:
    """The ``config.json`` the runtime reads (``model_type`` ``eagle3_base`` for an EAGLE3 base)."""
    config: dict[str, Any] = {
        "vocab_size": dims.vocab_size,
        "max_position_embeddings": dims.max_position_embeddings,
        "hidden_size": dims.hidden_size,
        "intermediate_size": dims.intermediate_size,
        "num_hidden_layers": dims.num_layers,
        "num_attention_heads": dims.num_heads,
        "num_key_value_heads": dims.num_kv_heads,
        "rope_theta": dims.rope_theta,
        "rope_scaling": dims.rope_scaling,
        "head_dim": dims.head_dim,
        "partial_rotary_factor": dims.partial_rotary_factor,
        "rms_norm_eps": dims.rms_norm_eps,
        "model_type": "eagle3_base" if eagle_base else "llm",
        "model": spec.family,
        "edgellm_version": EDGELLM_VERSION,
    }
    scaling = dims.rope_scaling or {}
    original = scaling.get("original_max_position_embeddings", hf_config.get("original_max_position_embeddings"))
    if original is not None:
        config["original_max_position_embeddings"] = original
    if spec.vision_language:
        for key, value in hf_config.items():
            if key.endswith(("_token_id", "_token_ids")):
                config[key] = value
    return config


def _fp16(rows: torch.Tensor) -> np.ndarray:
    return rows.to(torch.float16).numpy()


def write_embedding(store: TensorStore, spec: FamilySpec, path: Path, *, threads: int = 1) -> None:
    """``embedding.safetensors``: tensor ``embedding``, float16 [V, H], converted on ``threads`` threads."""
    shape = store.shape(spec.embed_tokens)
    rows = max(1, CHUNK_ELEMENTS // max(shape[-1], 1))
    chunks = (partial(_fp16, chunk) for chunk in store.row_chunks(spec.embed_tokens, rows))
    write_single_tensor(path, "embedding", shape, np.float16, chunks, threads=threads)


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")
