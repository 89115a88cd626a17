"""Reading HF checkpoints: normalized dimensions and lazily loaded tensors.

HF configs spell the same facts differently across transformers releases
(4.x: ``rope_theta`` / ``rope_scaling``; 5.x: ``rope_parameters``; ``head_dim``
absent, null or explicit). :func:`decoder_dims` normalizes them in one place.
:class:`TensorStore` reads safetensors shards by byte range, one tensor (or a
slice of rows) at a time, so a caller never holds more than the tensor it works on.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgellm_steps.errors import SourceError

if TYPE_CHECKING:  # planning imports this module and must not pay for importing torch
    import torch

    from edgellm_steps.safetensors_io import SafetensorsFile

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
    """Named tensors of a checkpoint's safetensors shards, read on demand."""

    def __init__(self, checkpoint: Path) -> None:
        from edgellm_steps.safetensors_io import SafetensorsFile

        self.checkpoint = Path(checkpoint)
        index = self.checkpoint / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            shard_paths = sorted({self.checkpoint / shard for shard in weight_map.values()})
        else:
            shard_paths = sorted(self.checkpoint.glob("*.safetensors"))
        if not shard_paths:
            raise SourceError(
                f"{self.checkpoint} holds no *.safetensors weights; convert the checkpoint with "
                "transformers' save_pretrained(safe_serialization=True)"
            )
        self._shard_of: dict[str, SafetensorsFile] = {}
        for path in shard_paths:
            if not path.is_file():
                raise SourceError(
                    f"{self.checkpoint}: shard {path.name} listed in the index is missing; re-download it"
                )
            shard = SafetensorsFile(path)
            for name in shard.names():
                self._shard_of[name] = shard

    def __contains__(self, name: str) -> bool:
        return name in self._shard_of

    def _shard(self, name: str) -> SafetensorsFile:
        shard = self._shard_of.get(name)
        if shard is None:
            raise SourceError(
                f"{self.checkpoint}: tensor {name!r} is in no safetensors shard; is the checkpoint whole?"
            )
        return shard

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shard(name).shape(name)

    def get(self, name: str) -> torch.Tensor:
        """The whole tensor, in the checkpoint's dtype."""
        return self._shard(name).read(name)

    def row_chunks(self, name: str, rows: int) -> Iterator[torch.Tensor]:
        """The tensor in slices of ``rows`` leading-dim rows, each read on its own."""
        return self._shard(name).read_row_chunks(name, rows)
