"""Geometry of the tiled vision towers (contract 7.3, 7.4): tiles in, 256 rows of the decoder's width per tile out.

The runtime cuts an image into S x S tiles (InternVL: dynamic tiles and a thumbnail; Phi-4-multimodal: HD
crops and a global view) and feeds them as one batch [blocks, 3, S, S]. InternViT embeds each tile's
(S/P)^2 patches after a CLS token, adds learned positions (one per patch and the CLS, no interpolation at
the native size), runs full attention within the tile, and the features of ``vision_feature_layer`` lose
the CLS row, go through a pixel shuffle that joins 2 x 2 neighbours (``downsample_ratio`` 0.5) and the MLP
projector. Phi-4-multimodal's SigLIP has no CLS token; its features of ``feature_layer`` are averaged over
2 x 2 neighbours and projected. :data:`TILE_LAYOUTS` holds what differs, per ``VisionSpec.tiles``. Every
fact here is read from the checkpoint's JSON and checked at planning, so a tower the graph cannot express is
refused in one line before any job runs.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from edgellm_steps.errors import SourceError

#: The tiles' rows per image token the runtime's InternVL runner allocates (contract 7.3).
RUNTIME_TILE_TOKENS = 256
#: The ids the 0.5 runtime's InternVL runner writes before and after every image's rows, whatever the tokenizer
#: says: ``<img>`` and ``</img>`` of the Qwen2.5-based InternVL3 tokenizers.
RUNTIME_IMAGE_BRACKETS = {"<img>": 151665, "</img>": 151666}
#: InternViT's norms, by ``vision_config.norm_type``.
NORMS = {"layer_norm": "layer", "rms_norm": "rms"}
#: The projector's LayerNorm epsilon (transformers' ``nn.LayerNorm`` default; the config has no key for it).
PROJECTOR_EPS = 1e-5


@dataclass(frozen=True)
class TileDims:
    """Sizes and switches of a tiled tower and its projector, from the checkpoint's config."""

    width: int
    out_width: int
    depth: int
    num_heads: int
    mlp_width: int
    hidden_act: str
    in_channels: int
    image_size: int
    patch_size: int
    #: ``layer`` (LayerNorm with bias) or ``rms`` (RMSNorm), blocks and q/k norms alike.
    norm: str
    norm_eps: float
    #: RMSNorm over the whole width on q and k (InternViT-6B), before the heads are split.
    qk_norm: bool
    #: Blocks run before the features are taken (``vision_feature_layer``: -1 is every block).
    feature_blocks: int
    #: The tower's final LayerNorm applies (``vision_feature_layer`` -1 without mean pooling).
    final_norm: bool
    #: Side of the patch groups the pixel shuffle joins (1 / ``downsample_ratio``).
    shuffle: int
    projector_act: str

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads

    @property
    def grid(self) -> int:
        """Patches per tile side."""
        return self.image_size // self.patch_size

    @property
    def tile_tokens(self) -> int:
        """Image tokens (output rows) per tile."""
        return (self.grid // self.shuffle) ** 2

    @property
    def shuffled_width(self) -> int:
        """Width of a joined group of patches: the projector's input."""
        return self.width * self.shuffle**2


def _side(value: Any, what: str, where: str) -> int:
    """A square size given as an int or an [h, w] pair."""
    sides = list(value) if isinstance(value, list | tuple) else [value, value]
    if len(sides) != 2 or sides[0] != sides[1] or not isinstance(sides[0], int) or sides[0] < 1:
        raise SourceError(f"{where}: vision_config.{what} {value!r} is not one square size; tiles are square")
    return sides[0]


#: transformers' defaults for the keys an InternVL ``config.json`` may leave out (held equal to
#: ``InternVLConfig()``'s by a test): planning reads the JSON alone, without importing transformers.
VISION_DEFAULTS = {
    "hidden_size": 1024,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "intermediate_size": 4096,
    "hidden_act": "gelu",
    "num_channels": 3,
    "image_size": 448,
    "patch_size": 14,
    "norm_type": "layer_norm",
    "layer_norm_eps": 1e-6,
    "use_qk_norm": False,
    "use_mean_pooling": True,
}
TOP_DEFAULTS = {
    "downsample_ratio": 0.5,
    "vision_feature_layer": -1,
    "vision_feature_select_strategy": "default",
    "projector_hidden_act": "gelu",
    "image_seq_length": 256,
}


def internvl_tile_dims(hf_config: dict[str, Any], llm_hidden: int, where: str) -> TileDims:
    """InternVL's tower sizes from ``config.json`` (transformers' defaults for absent keys), checked."""
    config = SimpleNamespace(**{**TOP_DEFAULTS, **{k: hf_config[k] for k in TOP_DEFAULTS if k in hf_config}})
    raw = hf_config.get("vision_config") or {}
    vision = SimpleNamespace(**{**VISION_DEFAULTS, **{k: raw[k] for k in VISION_DEFAULTS if k in raw}})
    image_size = _side(vision.image_size, "image_size", where)
    patch_size = _side(vision.patch_size, "patch_size", where)
    if image_size % patch_size:
        raise SourceError(
            f"{where}: vision_config.image_size {image_size} is not a multiple of patch_size {patch_size}"
        )
    if vision.norm_type not in NORMS:
        raise SourceError(f"{where}: vision_config.norm_type {vision.norm_type!r} is neither of {', '.join(NORMS)}")
    ratio = config.downsample_ratio
    shuffle = round(1 / ratio) if ratio else 0
    if shuffle != 2 or abs(ratio * shuffle - 1) > 1e-9:
        raise SourceError(
            f"{where}: downsample_ratio {ratio!r} is not supported; the runtime's tiles are pixel-shuffled by 0.5"
        )
    if config.vision_feature_select_strategy != "default":
        raise SourceError(
            f"{where}: vision_feature_select_strategy {config.vision_feature_select_strategy!r} keeps the CLS row; the "
            "runtime takes 256 rows per tile, the patches alone ('default')"
        )
    layer = config.vision_feature_layer
    depth = vision.num_hidden_layers
    if not isinstance(layer, int) or not -depth - 1 <= layer <= depth:
        raise SourceError(
            f"{where}: vision_feature_layer {layer!r} is not one layer of the {depth}-layer tower (a list of layers "
            "is not supported)"
        )
    if config.projector_hidden_act != "gelu" or vision.hidden_act != "gelu":
        raise SourceError(
            f"{where}: the vision activations are {vision.hidden_act!r} and {config.projector_hidden_act!r}; the graph "
            "has the exact GELU only"
        )
    dims = TileDims(
        width=vision.hidden_size,
        out_width=llm_hidden,
        depth=depth,
        num_heads=vision.num_attention_heads,
        mlp_width=vision.intermediate_size,
        hidden_act=vision.hidden_act,
        in_channels=vision.num_channels,
        image_size=image_size,
        patch_size=patch_size,
        norm=NORMS[vision.norm_type],
        norm_eps=vision.layer_norm_eps,
        qk_norm=bool(vision.use_qk_norm),
        feature_blocks=depth if layer == -1 else layer % (depth + 1),
        final_norm=layer == -1 and not vision.use_mean_pooling,
        shuffle=shuffle,
        projector_act=config.projector_hidden_act,
    )
    if config.image_seq_length != RUNTIME_TILE_TOKENS:
        raise SourceError(
            f"{where}: image_seq_length is {config.image_seq_length}, but the runtime's InternVL runner takes "
            f"{RUNTIME_TILE_TOKENS} image tokens per tile"
        )
    return _checked(dims, where)


def _checked(dims: TileDims, where: str) -> TileDims:
    """Refuse a tower the graph or the runtime cannot take: heads that do not divide the width, patches that do not
    group 2 x 2, or other than 256 groups per tile."""
    if dims.width % dims.num_heads:
        raise SourceError(
            f"{where}: vision_config.num_attention_heads {dims.num_heads} does not divide hidden_size {dims.width}"
        )
    if dims.grid % dims.shuffle:
        raise SourceError(f"{where}: a tile's {dims.grid} x {dims.grid} patches do not group by 2 x 2")
    if dims.tile_tokens != RUNTIME_TILE_TOKENS:
        raise SourceError(
            f"{where}: a tile gives {dims.tile_tokens} image tokens, but the runtime takes {RUNTIME_TILE_TOKENS} a tile"
        )
    return dims


#: transformers' defaults for the keys a Phi-4-multimodal ``vision_config`` may leave out (held equal to
#: ``Phi4MultimodalVisionConfig()``'s by a test).
PHI4MM_VISION_DEFAULTS = {
    "hidden_size": 1152,
    "num_hidden_layers": 27,
    "num_attention_heads": 16,
    "intermediate_size": 4304,
    "hidden_act": "gelu_pytorch_tanh",
    "num_channels": 3,
    "image_size": 448,
    "patch_size": 14,
    "crop_size": 448,
    "layer_norm_eps": 1e-6,
    "feature_layer": -2,
}


def phi4mm_tile_dims(hf_config: dict[str, Any], llm_hidden: int, where: str) -> TileDims:
    """Phi-4-multimodal's SigLIP sizes from ``config.json`` (transformers' defaults for absent keys), checked.

    Its features are ``hidden_states[feature_layer]`` (no final LayerNorm), averaged over 2 x 2 patches.
    """
    raw = hf_config.get("vision_config") or {}
    vision = SimpleNamespace(**{**PHI4MM_VISION_DEFAULTS, **{k: raw[k] for k in PHI4MM_VISION_DEFAULTS if k in raw}})
    image_size = _side(vision.image_size, "image_size", where)
    if vision.crop_size != image_size:
        raise SourceError(
            f"{where}: vision_config.crop_size {vision.crop_size} is not image_size {image_size}; the runtime's crops "
            "are the tower's tiles"
        )
    depth, layer = vision.num_hidden_layers, vision.feature_layer
    if not isinstance(layer, int) or not -depth - 1 <= layer <= depth:
        raise SourceError(f"{where}: vision_config.feature_layer {layer!r} is not one layer of the {depth}-layer tower")
    dims = TileDims(
        width=vision.hidden_size,
        out_width=llm_hidden,
        depth=depth,
        num_heads=vision.num_attention_heads,
        mlp_width=vision.intermediate_size,
        hidden_act=vision.hidden_act,
        in_channels=vision.num_channels,
        image_size=image_size,
        patch_size=_side(vision.patch_size, "patch_size", where),
        norm="layer",
        norm_eps=vision.layer_norm_eps,
        qk_norm=False,
        feature_blocks=layer % (depth + 1),
        final_norm=False,
        shuffle=2,
        projector_act="gelu",
    )
    if vision.hidden_act not in ("gelu_pytorch_tanh", "gelu"):
        raise SourceError(f"{where}: vision hidden_act {vision.hidden_act!r} is not supported (GELU, exact or tanh)")
    return _checked(dims, where)


def check_tile_processor(processor: dict[str, Any], dims: TileDims, processor_path: Path) -> None:
    """The processor cuts tiles of the tower's size (``size`` {height, width}), or the export would be fed others."""
    size = processor.get("size")
    sides = (size.get("height"), size.get("width")) if isinstance(size, dict) else (None, None)
    if sides != (dims.image_size, dims.image_size):
        raise SourceError(
            f"{processor_path}: size is {size!r} but the vision tower takes {dims.image_size} x {dims.image_size} "
            "tiles; restore the checkpoint's own processor files"
        )


def runtime_tile_warning(checkpoint: Path) -> str | None:
    """Why the runtime would bracket this checkpoint's images with the wrong tokens, or None when it would not.

    Read from ``tokenizer.json``'s added tokens alone (planning imports no tokenizer library).
    """
    try:
        added = json.loads((Path(checkpoint) / "tokenizer.json").read_text(encoding="utf-8")).get("added_tokens")
    except (OSError, ValueError, AttributeError):
        return None  # the tokenizer check names an unreadable tokenizer
    ids = {token.get("content"): token.get("id") for token in added or [] if isinstance(token, dict)}
    found = {token: ids.get(token) for token in RUNTIME_IMAGE_BRACKETS}
    if found == RUNTIME_IMAGE_BRACKETS:
        return None
    return (
        f"its tokenizer's <img> / </img> ids are {found['<img>']} / {found['</img>']}, but the Edge-LLM runtime's "
        f"InternVL runner writes {' / '.join(map(str, RUNTIME_IMAGE_BRACKETS.values()))} around every image, so "
        "its prompts would carry other tokens there (the exports and their verify are still right)"
    )


@dataclass(frozen=True)
class TileLayout:
    """What differs between the tiled towers, per ``VisionSpec.tiles``."""

    dims: Callable[[dict[str, Any], int, str], TileDims]
    #: The projector tensor (under the spec's projector prefix) that locates it.
    projector_probe: str
    #: Why the runtime would mishandle this checkpoint although its exports are right, or None.
    warning: Callable[[Path], str | None] | None = None


TILE_LAYOUTS = {
    "internvl": TileLayout(internvl_tile_dims, "linear_1.weight", runtime_tile_warning),
    "phi4mm": TileLayout(phi4mm_tile_dims, "img_projection_up.weight"),
}


def tile_dims(tiles: str, hf_config: dict[str, Any], llm_hidden: int, *, where: str = "config.json") -> TileDims:
    """The sizes of a tiled tower of layout ``tiles``, checked."""
    return TILE_LAYOUTS[tiles].dims(hf_config, llm_hidden, where)
