"""Vision tower geometry: its sizes, how images become patches, and where a checkpoint keeps it.

Model facts, read by the exporter, the fp8 calibration and the verifier alike.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgellm_steps.artifacts.checkpoint import DecoderDims, TensorStore, decoder_dims
from edgellm_steps.artifacts.sources import read_hf_config, read_json_object
from edgellm_steps.errors import SourceError
from edgellm_steps.models.families import FAMILIES, FamilySpec, VisionSpec, family_for, runtime_rope_warning
from edgellm_steps.models.tile_geometry import TILE_LAYOUTS, TileDims, check_tile_processor, tile_dims

#: The runtime computes the vision rotary angles with this base (it does not read the config).
RUNTIME_VISION_ROPE_THETA = 10000.0
#: The image processor's file: the runtime reads it beside the vision engine (patch and merge sizes, mean, std).
PROCESSOR_CONFIG = "preprocessor_config.json"
#: (``preprocessor_config.json`` key, ``vision_config`` key) pairs that must agree: the processor cuts the
#: image into the patches and merge blocks the tower was built for.
PROCESSOR_AGREES = (("patch_size", "patch_size"), ("merge_size", "spatial_merge_size"))
#: The activations the vision MLPs use (HF ``hidden_act``); Qwen3-VL's blocks use the tanh GELU.
ACTIVATIONS = ("silu", "quick_gelu", "gelu", "gelu_pytorch_tanh")


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
    #: Qwen3-VL: blocks after which a deepstack merger taps the hidden states (one graph output each).
    deepstack_indexes: tuple[int, ...] = ()
    #: Qwen3-VL: side G of the learned G x G position grid (0: the tower has no learned positions).
    position_grid: int = 0

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
    # Qwen2-VL sizes its fc1/fc2 MLP by mlp_ratio; the gated (Qwen2.5-VL) and Qwen3-VL MLPs by intermediate_size.
    sized = spec.gated_mlp or spec.deepstack
    mlp_width = getattr(vision_config, "intermediate_size", None) if sized else None
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
        **(_deepstack_dims(vision_config) if spec.deepstack else {}),
    )
    if dims.hidden_act not in ACTIVATIONS:
        raise SourceError(f"vision hidden_act {dims.hidden_act!r} is not supported ({', '.join(ACTIVATIONS)})")
    if dims.width % dims.num_heads or dims.head_dim % 4:
        raise SourceError(
            f"vision width {dims.width} over {dims.num_heads} heads must give a head dim divisible by 4 "
            "(two rotary axes of cos|sin halves)"
        )
    return dims


def _deepstack_dims(vision_config: Any) -> dict[str, Any]:
    """Qwen3-VL's extra sizes, checked: the runtime samples a square position grid and taps existing blocks."""
    positions = vision_config.num_position_embeddings
    side = math.isqrt(positions)
    if side < 1 or side * side != positions:
        raise SourceError(
            f"vision num_position_embeddings {positions} is not a square grid; the runtime samples a G x G grid"
        )
    indexes = tuple(vision_config.deepstack_visual_indexes)
    depth = vision_config.depth
    # Ascending: transformers lists the features in block order, the runtime in merger order; they agree only so.
    if list(indexes) != sorted(set(indexes)) or any(not 0 <= i < depth for i in indexes):
        raise SourceError(
            f"vision deepstack_visual_indexes {list(indexes)} must name distinct blocks of the {depth}-block tower "
            "in ascending order"
        )
    return {"deepstack_indexes": indexes, "position_grid": side}


def check_vision_source(checkpoint: Path, hf_config: dict[str, Any], spec: VisionSpec, llm_hidden: int) -> None:
    """Refuse in one line a VLM checkpoint whose parts cannot work together, from its JSON files alone.

    Every check is on what the files state (transformers fills absent keys with its defaults,
    which agree by construction): a vision config, a processor config that is a JSON object
    cutting images into the tower's patches and merge blocks, heads that divide the tower's
    width, and a merger whose output is the language model's width. Any of these wrong, the
    export would finish and the runtime would fail (or the graph emit [*, 96] rows for a
    128-wide decoder).
    """
    vision = hf_config.get("vision_config")
    config_path = Path(checkpoint) / "config.json"
    if not isinstance(vision, dict):
        raise SourceError(
            f"{config_path} has no vision_config object, which every vision-language checkpoint has; "
            "restore the checkpoint's own config.json"
        )
    processor_path = Path(checkpoint) / PROCESSOR_CONFIG
    if not processor_path.is_file():
        raise SourceError(
            f"{checkpoint} has no {PROCESSOR_CONFIG}, which the runtime reads beside the vision engine "
            "(patch size, merge size, mean and std); add the model's processor files to the checkpoint"
        )
    processor = read_json_object(processor_path, what="an image processor config")
    if spec.tiled:
        check_tile_processor(
            processor, tile_dims(spec.tiles, hf_config, llm_hidden, where=str(config_path)), processor_path
        )
        return
    for processor_key, vision_key in PROCESSOR_AGREES:
        cuts, built = processor.get(processor_key), vision.get(vision_key)
        if cuts is not None and built is not None and cuts != built:
            raise SourceError(
                f"{processor_path}: {processor_key} is {cuts!r} but vision_config.{vision_key} is {built!r}; the "
                "processor does not belong to this vision tower: restore the checkpoint's own processor files"
            )
    width, heads = vision.get(spec.width_key), vision.get("num_heads")
    if isinstance(width, int) and isinstance(heads, int) and (heads < 1 or width % heads):
        raise SourceError(
            f"{config_path}: vision_config.num_heads {heads} does not divide vision_config.{spec.width_key} {width}; "
            "restore the checkpoint's own config.json"
        )
    out_width = vision.get(spec.out_width_key)
    if out_width is not None and out_width != llm_hidden:
        raise SourceError(
            f"{config_path}: vision_config.{spec.out_width_key} is {out_width!r} but the language model's hidden "
            f"size is {llm_hidden}: the vision features would not fit its embeddings; restore the checkpoint's own "
            "config.json"
        )


def runtime_warnings(spec: FamilySpec, dims: DecoderDims, checkpoint: Path) -> list[str]:
    """What the runtime would get wrong with this checkpoint although its exports are right (planning warns)."""
    layout = TILE_LAYOUTS[spec.vision.tiles] if spec.vision is not None and spec.vision.tiled else None
    found = (runtime_rope_warning(dims), layout.warning(checkpoint) if layout and layout.warning else None)
    return [warning for warning in found if warning is not None]


def tower_prefix(store: TensorStore, spec: VisionSpec) -> str:
    """Which of the spec's prefixes the checkpoint stores the vision tower under."""
    for prefix in spec.prefixes:
        if f"{prefix}{spec.probe}" in store:
            return prefix
    tried = ", ".join(f"{prefix}{spec.probe}" for prefix in spec.prefixes)
    raise SourceError(f"checkpoint holds no vision tower (looked for {tried}); is it complete?")


def projector_prefix(store: TensorStore, spec: VisionSpec) -> str | None:
    """Which of the spec's projector prefixes the checkpoint stores the projector under (None: no projector)."""
    if not spec.tiled:
        return None
    probe = TILE_LAYOUTS[spec.tiles].projector_probe
    for prefix in spec.projector_prefixes:
        if f"{prefix}{probe}" in store:
            return prefix
    tried = ", ".join(f"{prefix}{probe}" for prefix in spec.projector_prefixes)
    raise SourceError(f"checkpoint holds no vision projector (looked for {tried}); is it complete?")


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
    #: A tiled tower's (InternVL) are :class:`TileDims`.
    dims: VisionDims | TileDims
    store: TensorStore
    #: Where the checkpoint keeps the tower's tensors (``visual.`` or ``model.visual.``).
    prefix: str
    #: Where it keeps the projector outside the tower (InternVL's ``multi_modal_projector.``), if any.
    projector: str | None = None


def open_vision_tower(checkpoint: Path) -> VisionTower:
    """The vision tower of a local VLM checkpoint, or a one-line refusal (text-only model, no tower tensors)."""
    hf_config = read_hf_config(checkpoint)
    _, spec = vision_spec(hf_config, str(checkpoint))
    llm_hidden = decoder_dims(hf_config).hidden_size
    check_vision_source(checkpoint, hf_config, spec, llm_hidden)
    if spec.tiled:
        dims: VisionDims | TileDims = tile_dims(
            spec.tiles, hf_config, llm_hidden, where=str(checkpoint / "config.json")
        )
    else:
        dims = load_vision_dims(checkpoint, spec)
    store = TensorStore(checkpoint)
    prefix, projector = tower_prefix(store, spec), projector_prefix(store, spec)
    return VisionTower(checkpoint, hf_config, spec, dims, store, prefix, projector)
