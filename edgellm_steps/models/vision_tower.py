"""The transformers vision tower of a VLM checkpoint, loaded alone.

fp8 calibration and the vision reference of verify-onnx run the tower in torch; the
language model (billions of parameters) is never built. The tower is instantiated
from the checkpoint's ``vision_config`` by its own transformers class and its tensors
are read from the safetensors shards (no pickle, no remote code).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgellm_steps.artifacts.checkpoint import TensorStore
from edgellm_steps.errors import SourceError
from edgellm_steps.models.families import VisionSpec
from edgellm_steps.models.vision_geometry import VisionTower


def load_vision_tower(checkpoint: Path, spec: VisionSpec, store: TensorStore, prefix: str, dtype: Any = None) -> Any:
    """The tower module (eval mode, float32 unless ``dtype``) holding the checkpoint's ``prefix*`` tensors."""
    import torch
    from transformers import AutoConfig

    module_name, _, class_name = spec.hf_tower_class.rpartition(".")
    tower_class = getattr(importlib.import_module(module_name), class_name)
    vision_config = AutoConfig.from_pretrained(str(checkpoint)).vision_config
    tower = tower_class._from_config(vision_config, dtype=dtype or torch.float32)
    _load_part(tower, store, prefix, checkpoint, "vision tower")
    return tower.eval()


def _load_part(module: Any, store: TensorStore, prefix: str, checkpoint: Path, what: str) -> None:
    """Fill ``module`` with the checkpoint's ``prefix*`` tensors, every one of them and no other."""
    state = {name.removeprefix(prefix): store.get(name) for name in store.names() if name.startswith(prefix)}
    missing, unexpected = module.load_state_dict(state, strict=False)
    if missing or unexpected:
        first = (missing or unexpected)[0]
        how = "lacks" if missing else "has an unexpected"
        raise SourceError(f"{checkpoint}: the {what} {how} tensor {prefix}{first}; is the checkpoint complete?")


class TileFeatures:
    """transformers' image-feature path of a tiled VLM, without its language model: tiles [N, 3, S, S] in,
    [N * 256, H] out (:func:`load_tile_features`). ``tower`` is the module fp8 calibration quantizes, its
    module names the checkpoint's below the tower prefix."""

    def __init__(self, model: Any, features: Callable[[Any, Any], Any], tower: Any) -> None:
        # ``features(model, tiles)`` reaches every module through ``model``, so that a deep copy (verify's
        # float16 floor) computes with its own copies, not the original's.
        self.model, self._features, self.tower = model, features, tower

    def __call__(self, tiles: Any) -> Any:
        out = self._features(self.model, tiles)
        return out.reshape(-1, out.shape[-1])

    def to(self, *args: Any) -> TileFeatures:
        """Cast or move the model (as ``nn.Module.to``), in place."""
        self.model.to(*args)
        return self


def load_tile_features(tower: VisionTower, store: TensorStore | None = None, dtype: Any = None) -> TileFeatures:
    """The image-feature path of a tiled tower, in float32 unless ``dtype``, with the checkpoint's (or ``store``'s)
    tower and projector tensors."""
    import torch
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(tower.checkpoint))
    store = tower.store if store is None else store
    return _TILE_REFERENCES[tower.spec.tiles](tower, config, store, dtype or torch.float32)


def _internvl_features(tower: VisionTower, config: Any, store: TensorStore, dtype: Any) -> TileFeatures:
    """``InternVLModel.get_image_features`` (tower, CLS drop, pixel shuffle, projector) on a model whose decoder
    has no layers and a one-row vocabulary: transformers' code, without the decoder's billions of parameters."""
    from transformers import InternVLModel

    config.text_config.num_hidden_layers = 0
    config.text_config.vocab_size = 1
    model = InternVLModel._from_config(config, dtype=dtype)
    _load_part(model.vision_tower, store, tower.prefix, tower.checkpoint, "vision tower")
    _load_part(model.multi_modal_projector, store, tower.projector, tower.checkpoint, "vision projector")
    model.eval()
    return TileFeatures(model, _internvl_image_features, model.vision_tower)


def _internvl_image_features(model: Any, tiles: Any) -> Any:
    return model.get_image_features(pixel_values=tiles).pooler_output


def _phi4mm_features(tower: VisionTower, config: Any, store: TensorStore, dtype: Any) -> TileFeatures:
    """Phi-4-multimodal's per-crop image features, from transformers' SigLIP and Phi-4's own projection modules.

    The tower is transformers' ``SiglipVisionModel`` holding the checkpoint's ``img_processor`` tensors, not the
    native ``Phi4MultimodalVisionModel``: in transformers 5.23 that class's attention is marked causal, and its
    eager and SDPA paths disagree by orders of magnitude, while SigLIP (and Phi-4-multimodal's published remote
    code) attends both ways. Then, as ``Phi4MultimodalImageEmbedding`` does per crop: ``hidden_states
    [feature_layer]`` as a square grid, its ``image_token_compression`` (2 x 2 average), ``img_projection_up``,
    exact GELU, ``img_projection_down``.
    """
    import torch
    from transformers import SiglipVisionConfig, SiglipVisionModel
    from transformers.models.phi4_multimodal.modeling_phi4_multimodal import Phi4MultimodalImageEmbedding

    vision = config.vision_config
    siglip = SiglipVisionModel._from_config(
        SiglipVisionConfig(**{key: getattr(vision, key) for key in SIGLIP_KEYS}, attn_implementation="eager"),
        dtype=dtype,
    ).eval()
    _load_part(siglip, store, tower.prefix, tower.checkpoint, "vision tower")
    config.vision_config.num_hidden_layers = 0  # the native tower stays empty: SigLIP replaces it
    embed = Phi4MultimodalImageEmbedding(config).to(dtype).eval()
    embed.img_processor = None
    state = {n.removeprefix(tower.projector): store.get(n) for n in store.names() if n.startswith(tower.projector)}
    embed.load_state_dict({n: t for n, t in state.items() if not n.startswith("img_processor.")}, strict=True)
    model = torch.nn.ModuleDict({"siglip": siglip, "embed": embed})
    layer = vision.feature_layer

    def features(model: Any, tiles: Any) -> Any:
        hidden = model["siglip"](pixel_values=tiles, output_hidden_states=True).hidden_states[layer]
        side = int(hidden.shape[1] ** 0.5)
        grid = hidden.reshape(-1, side, side, hidden.shape[-1]).permute(0, 3, 1, 2)
        embed = model["embed"]
        pooled = embed.image_token_compression(grid).permute(0, 2, 3, 1).flatten(1, 2)
        up = torch.nn.functional.gelu(embed.img_projection_up(pooled))
        return embed.img_projection_down(up)

    return TileFeatures(model, features, siglip)


#: The Phi-4-multimodal vision config keys SigLIP's config takes as they are.
SIGLIP_KEYS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_channels",
    "image_size",
    "patch_size",
    "hidden_act",
    "layer_norm_eps",
)
_TILE_REFERENCES = {"internvl": _internvl_features, "phi4mm": _phi4mm_features}
