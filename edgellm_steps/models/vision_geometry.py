"""Vision tower geometry: its sizes, how images become patches, and where a checkpoint keeps it.

Model facts, read by the exporter, the fp8 calibration and the verifier alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgellm_steps.artifacts.checkpoint import TensorStore
from edgellm_steps.artifacts.sources import read_hf_config
from edgellm_steps.errors import SourceError
from edgellm_steps.models.families import FAMILIES, FamilySpec, VisionSpec, family_for

#: The runtime computes the vision rotary angles with this base (it does not read the config).
RUNTIME_VISION_ROPE_THETA = 10000.0
#: The activations the vision MLPs use (HF ``hidden_act``).
ACTIVATIONS = ("silu", "quick_gelu", "gelu")


@dataclass(frozen=True)
class VisionDims:
    """Sizes of a vision tower, from the checkpoint's ``vision_config``."""

    width: int
    out_width: int
    depth: int
    num_heads: int
    mlp_width: int
    hidden_act: str
    in_channels: int
    patch_size: int
    temporal_patch_size: int
    merge_size: int
    window_size: int | None
    fullatt_blocks: tuple[int, ...]
    norm_eps: float = 1e-6

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads

    @property
    def patch_dim(self) -> int:
        """C * T * P * P: the length of one flattened patch."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    @property
    def merge_unit(self) -> int:
        """Patches per image token (2 x 2)."""
        return self.merge_size**2


def vision_dims(vision_config: Any, spec: VisionSpec) -> VisionDims:
    """Sizes of the tower described by a transformers vision config object (defaults filled in)."""
    width = getattr(vision_config, spec.width_key)
    mlp_width = getattr(vision_config, "intermediate_size", None) if spec.gated_mlp else None
    if mlp_width is None:
        mlp_width = int(width * vision_config.mlp_ratio)
    rope = getattr(vision_config, "rope_parameters", None) or {}
    theta = float(rope.get("rope_theta", RUNTIME_VISION_ROPE_THETA))
    if theta != RUNTIME_VISION_ROPE_THETA:
        raise SourceError(
            f"vision rope_theta is {theta}, but the Edge-LLM runtime computes the vision rotary angles with "
            f"{RUNTIME_VISION_ROPE_THETA:g}; this checkpoint cannot run there"
        )
    dims = VisionDims(
        width=width,
        out_width=getattr(vision_config, spec.out_width_key),
        depth=vision_config.depth,
        num_heads=vision_config.num_heads,
        mlp_width=mlp_width,
        hidden_act=vision_config.hidden_act,
        in_channels=vision_config.in_channels,
        patch_size=vision_config.patch_size,
        temporal_patch_size=vision_config.temporal_patch_size,
        merge_size=vision_config.spatial_merge_size,
        window_size=getattr(vision_config, "window_size", None) if spec.window_attention else None,
        fullatt_blocks=tuple(getattr(vision_config, "fullatt_block_indexes", None) or ()),
    )
    if dims.hidden_act not in ACTIVATIONS:
        raise SourceError(f"vision hidden_act {dims.hidden_act!r} is not supported ({', '.join(ACTIVATIONS)})")
    if dims.width % dims.num_heads or dims.head_dim % 4:
        raise SourceError(
            f"vision width {dims.width} over {dims.num_heads} heads must give a head dim divisible by 4 "
            "(two rotary axes of cos|sin halves)"
        )
    return dims


def tower_prefix(store: TensorStore, spec: VisionSpec) -> str:
    """Which of the spec's prefixes the checkpoint stores the vision tower under."""
    for prefix in spec.prefixes:
        if f"{prefix}patch_embed.proj.weight" in store:
            return prefix
    tried = ", ".join(f"{prefix}patch_embed.proj.weight" for prefix in spec.prefixes)
    raise SourceError(f"checkpoint holds no vision tower (looked for {tried}); is it complete?")


def vision_spec(hf_config: dict, where: str) -> tuple[FamilySpec, VisionSpec]:
    """The family and vision spec of a VLM checkpoint, or a one-line refusal for a text-only model."""
    family = family_for(hf_config, where=where)
    if family.vision is None:
        vlms = ", ".join(sorted(arch for spec in FAMILIES if spec.vision is not None for arch in spec.architectures))
        raise SourceError(
            f"{where} is a {family.family} language model with no vision tower; export-visual takes {vlms}"
        )
    return family, family.vision


def load_vision_dims(checkpoint: Path, spec: VisionSpec) -> VisionDims:
    """The tower's sizes, through transformers' config class (which fills its defaults)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(checkpoint))
    return vision_dims(config.vision_config, spec)


Grid = tuple[int, int, int]


def patchify(frames: np.ndarray, dims: VisionDims) -> tuple[np.ndarray, Grid]:
    """Normalized frames [T, C, H, W] (T a multiple of the temporal patch) -> patches [hw, C*T*P*P] and (t, h, w).

    A still image is its one frame repeated ``temporal_patch_size`` times. Patches are
    ordered by merge block (row-major), then row-major within the block.
    """
    t, c, h, w = frames.shape
    tp, p, m = dims.temporal_patch_size, dims.patch_size, dims.merge_size
    if t % tp or h % (p * m) or w % (p * m) or c != dims.in_channels:
        raise ValueError(f"frames {frames.shape} do not tile into {tp} x {p * m} x {p * m} blocks of {c} channels")
    gt, gh, gw = t // tp, h // p, w // p
    blocks = frames.reshape(gt, tp, c, gh // m, m, p, gw // m, m, p)
    patches = blocks.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8).reshape(gt * gh * gw, c * tp * p * p)
    return np.ascontiguousarray(patches), (gt, gh, gw)


@dataclass(frozen=True)
class VisionTower:
    """A VLM checkpoint's vision tower, opened and checked once: what export, calibration and verify share."""

    checkpoint: Path
    hf_config: dict[str, Any]
    spec: VisionSpec
    dims: VisionDims
    store: TensorStore
    #: Where the checkpoint keeps the tower's tensors (``visual.`` or ``model.visual.``).
    prefix: str


def open_vision_tower(checkpoint: Path) -> VisionTower:
    """The vision tower of a local VLM checkpoint, or a one-line refusal (text-only model, no tower tensors)."""
    hf_config = read_hf_config(checkpoint)
    _, spec = vision_spec(hf_config, str(checkpoint))
    dims = load_vision_dims(checkpoint, spec)
    store = TensorStore(checkpoint)
    return VisionTower(checkpoint, hf_config, spec, dims, store, tower_prefix(store, spec))
