"""The transformers vision tower of a VLM checkpoint, loaded alone.

fp8 calibration and the vision reference of verify-onnx run the tower in torch; the
language model (billions of parameters) is never built. The tower is instantiated
from the checkpoint's ``vision_config`` by its own transformers class and its tensors
are read from the safetensors shards (no pickle, no remote code).
"""

from __future__ import annotations

import importlib
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
    """transformers' own image-feature path of a tiled VLM (InternVL), without its language model.

    ``InternVLModel.get_image_features`` (tower, CLS drop, pixel shuffle, projector) on a model whose
    decoder has no layers and a one-row vocabulary: the path is transformers' code, the billions of
    decoder parameters are never built. Calling it with tiles [N, 3, S, S] gives [N * 256, H].
    """

    def __init__(self, model: Any) -> None:
        self.model = model

    def __call__(self, tiles: Any) -> Any:
        out = self.model.get_image_features(pixel_values=tiles).pooler_output
        return out.reshape(-1, out.shape[-1])

    def to(self, *args: Any) -> TileFeatures:
        """Cast or move the model (as ``nn.Module.to``), in place."""
        self.model.to(*args)
        return self


def load_tile_features(tower: VisionTower, store: TensorStore | None = None, dtype: Any = None) -> TileFeatures:
    """The image-feature path of a tiled tower, in float32 unless ``dtype``, with the checkpoint's (or ``store``'s)
    tower and projector tensors."""
    import torch
    import transformers
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(tower.checkpoint))
    config.text_config.num_hidden_layers = 0
    config.text_config.vocab_size = 1
    model_class = getattr(transformers, tower.spec.hf_feature_class)
    model = model_class._from_config(config, dtype=dtype or torch.float32)
    store = tower.store if store is None else store
    _load_part(model.vision_tower, store, tower.prefix, tower.checkpoint, "vision tower")
    _load_part(model.multi_modal_projector, store, tower.projector, tower.checkpoint, "vision projector")
    return TileFeatures(model.eval())
