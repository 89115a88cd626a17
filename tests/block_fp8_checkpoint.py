"""Writing block-FP8 checkpoints for tests, as Qwen's and DeepSeek's ``*-FP8`` releases are made.

Every decoder Linear of a float checkpoint is quantized to F8_E4M3 in 128 x 128 blocks (the last
block of a row or column cropped): scale = block amax / 448, codes = W / scale rounded to E4M3,
and the scale stored as ``weight_scale_inv`` (the name is the releases'; the value multiplies).
Everything else is copied, and config.json gains Qwen's ``quantization_config``.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

BLOCK = 128
FP8_MAX = 448.0
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
#: As Qwen3's FP8 releases write it.
QUANTIZATION_CONFIG = {
    "activation_scheme": "dynamic",
    "fmt": "e4m3",
    "quant_method": "fp8",
    "weight_block_size": [128, 128],
}


def quantize_blocks(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(F8_E4M3 codes, float32 scales [ceil(out/128), ceil(in/128)]) of one [out, in] weight."""
    w = weight.float()
    rows, cols = w.shape
    grid = (math.ceil(rows / BLOCK), math.ceil(cols / BLOCK))
    padded = torch.zeros(grid[0] * BLOCK, grid[1] * BLOCK)
    padded[:rows, :cols] = w.abs()
    amax = padded.reshape(grid[0], BLOCK, grid[1], BLOCK).amax(dim=(1, 3))
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    per_element = scale.repeat_interleave(BLOCK, 0)[:rows].repeat_interleave(BLOCK, 1)[:, :cols]
    codes = (w / per_element).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return codes, scale


def write_block_fp8_checkpoint(source: Path, destination: Path) -> Path:
    """The block-FP8 release of the float checkpoint ``source`` (one ``model.safetensors``) in ``destination``."""
    tensors = load_file(str(source / "model.safetensors"))
    release = {}
    for name, tensor in tensors.items():
        module = name.removesuffix(".weight")
        if name.endswith(".weight") and module.rsplit(".", 1)[-1] in LINEARS:
            release[name], release[f"{module}.weight_scale_inv"] = quantize_blocks(tensor)
        else:
            release[name] = tensor
    shutil.copytree(source, destination, ignore=shutil.ignore_patterns("*.safetensors"))
    save_file(release, str(destination / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((destination / "config.json").read_text())
    config["quantization_config"] = dict(QUANTIZATION_CONFIG)
    (destination / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return destination
