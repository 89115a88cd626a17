"""Reading HF checkpoints: normalized dimensions and lazily loaded tensors.

HF configs spell the same facts differently across transformers releases
(4.x: ``rope_theta`` / ``rope_scaling``; 5.x: ``rope_parameters``; ``head_dim``
absent, null or explicit). :func:`decoder_dims` normalizes them in one place.
:class:`TensorStore` memory-maps safetensors shards and hands out one tensor at
a time, so a caller never holds the whole checkpoint.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from edgellm_steps.errors import SourceError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DecoderDims:
    """The shape facts of a decoder-only LLM that the export needs."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    partial_rotary_factor: float
    tie_word_embeddings: bool
    hidden_act: str

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)


def _rope_facts(cfg: dict[str, Any]) -> tuple[float, dict[str, Any] | None, float]:
    params = cfg.get("rope_parameters")
    if isinstance(params, dict) and "rope_theta" in params:
        theta = float(params["rope_theta"])
        scaling = {k: v for k, v in params.items() if k not in ("rope_theta", "partial_rotary_factor")}
        partial = params.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
    else:
        theta = float(cfg.get("rope_theta", 10000.0))
        scaling = dict(cfg["rope_scaling"]) if cfg.get("rope_scaling") else None
        partial = cfg.get("partial_rotary_factor", 1.0)
    if scaling is not None:
        rope_type = scaling.get("rope_type", scaling.get("type", "default"))
        scaling["rope_type"] = rope_type
        scaling.pop("type", None)
        if rope_type == "default":
            scaling = None
    return theta, scaling, float(partial if partial is not None else 1.0)


def decoder_dims(cfg: dict[str, Any]) -> DecoderDims:
    """Normalize an HF decoder ``config.json`` (text part) into :class:`DecoderDims`."""
    if "text_config" in cfg and "hidden_size" not in cfg:
        cfg = {**cfg["text_config"], "tie_word_embeddings": cfg.get("tie_word_embeddings", False)}
    try:
        hidden = int(cfg["hidden_size"])
        heads = int(cfg["num_attention_heads"])
        theta, scaling, partial = _rope_facts(cfg)
        return DecoderDims(
            hidden_size=hidden,
            intermediate_size=int(cfg["intermediate_size"]),
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            vocab_size=int(cfg["vocab_size"]),
            max_position_embeddings=int(cfg["max_position_embeddings"]),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            partial_rotary_factor=partial,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            hidden_act=str(cfg.get("hidden_act", "silu")),
        )
    except KeyError as err:
        raise SourceError(
            f"config.json lacks {err.args[0]!r}, which every decoder LLM config has; is it complete?"
        ) from err


class TensorStore:
    """Named tensors of a checkpoint's safetensors shards, loaded one at a time (memory-mapped)."""

    def __init__(self, checkpoint: Path) -> None:
        self.checkpoint = Path(checkpoint)
        self._shard_of: dict[str, Path] = {}
        index = self.checkpoint / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self._shard_of = {name: self.checkpoint / shard for name, shard in weight_map.items()}
        else:
            shards = sorted(self.checkpoint.glob("*.safetensors"))
            if not shards:
                raise SourceError(
                    f"{self.checkpoint} holds no *.safetensors weights; convert the checkpoint with "
                    "transformers' save_pretrained(safe_serialization=True)"
                )
            for shard in shards:
                with safe_open(shard, framework="pt") as handle:
                    for name in handle.keys():  # noqa: SIM118 - safe_open is not iterable
                        self._shard_of[name] = shard
        self._handles: dict[Path, Any] = {}

    def __contains__(self, name: str) -> bool:
        return name in self._shard_of

    def names(self) -> list[str]:
        return list(self._shard_of)

    def get(self, name: str) -> torch.Tensor:
        shard = self._shard_of.get(name)
        if shard is None:
            raise SourceError(
                f"{self.checkpoint}: tensor {name!r} is missing from the safetensors shards; is the checkpoint whole?"
            )
        handle = self._handles.get(shard)
        if handle is None:
            handle = self._handles[shard] = safe_open(shard, framework="pt")
        return handle.get_tensor(name)

    def shape(self, name: str) -> list[int]:
        shard = self._shard_of[name]
        handle = self._handles.get(shard) or safe_open(shard, framework="pt")
        self._handles[shard] = handle
        return list(handle.get_slice(name).get_shape())
