"""What a calibration pass opens: the float checkpoint, the device and dtype it runs in, the default sizes.

calibrate-llm, quantize-llm and quantize-draft share these; calibrate-llm imports nothing of the recipes, so a
changed recipe reruns the quantize jobs but never the shared statistics pass.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgellm_steps.artifacts.checkpoint import TensorStore
from edgellm_steps.errors import EdgeLLMError, MissingDependencyError, PrecisionError
from edgellm_steps.quant.checkpoint_record import open_checkpoint

DEFAULT_CALIB_SIZE = 512
DEFAULT_CALIB_MAX_TOKENS = 512


def device_and_dtype(device: str):
    """The torch device and the calibration dtype: float32 on the CPU, float16 on a GPU."""
    import torch

    if device == "cuda":
        if not torch.cuda.is_available():
            raise MissingDependencyError("--device cuda was given but torch sees no CUDA GPU; use --device cpu")
        return "cuda", torch.float16
    if device != "cpu":
        raise EdgeLLMError(f"unknown device '{device}': use cpu or cuda")
    return "cpu", torch.float32


def float_source(model_dir: str | Path) -> Any:
    """The checkpoint to calibrate (``open_checkpoint``'s record), refused when it is already quantized, every
    shard header checked before an hour of calibration."""
    opened = open_checkpoint(model_dir)
    if opened.held is not None:
        raise PrecisionError(
            f"{opened.path} is already quantized as {opened.held.precision} ({opened.held.origin}); it is not "
            f"quantized again: export it directly (precision {opened.held.precision} in the workflow)"
        )
    TensorStore(opened.path)
    return opened
