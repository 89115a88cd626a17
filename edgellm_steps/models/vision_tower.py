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


def load_vision_tower(checkpoint: Path, spec: VisionSpec, store: TensorStore, prefix: str, dtype: Any = None) -> Any:
    """The tower module (eval mode, float32 unless ``dtype``) holding the checkpoint's ``prefix*`` tensors."""
    import torch
    from transformers import AutoConfig

    module_name, _, class_name = spec.hf_tower_class.rpartition(".")
    tower_class = getattr(importlib.import_module(module_name), class_name)
    vision_config = AutoConfig.from_pretrained(str(checkpoint)).vision_config
    tower = tower_class._from_config(vision_config, dtype=dtype or torch.float32)
    names = [name for name in store.names() if name.startswith(prefix)]
    state = {name.removeprefix(prefix): store.get(name) for name in names}
    missing, unexpected = tower.load_state_dict(state, strict=False)
    if missing or unexpected:
        first = (missing or unexpected)[0]
        what = "lacks" if missing else "has an unexpected"
        raise SourceError(f"{checkpoint}: the vision tower {what} tensor {prefix}{first}; is the checkpoint complete?")
    return tower.eval()
