"""Block-FP8 releases made locally, as Qwen's and DeepSeek's ``*-FP8`` checkpoints are made: test and bench sources.

Every decoder Linear of a float checkpoint is quantized to F8_E4M3 in 128 x 128 blocks (the last
block of a row or column cropped): scale = block amax / 448, codes = W / scale rounded to E4M3, and
the scale stored as ``weight_scale_inv`` beside its weight (the releases' name; the value multiplies).
Every other tensor and file is copied, shard by shard (one shard in memory), and config.json gains
Qwen3's ``quantization_config``. The dequantize step is proven against transformers, never against this.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

BLOCK = 128
FP8_MAX = 448.0
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
#: As Qwen3's FP8 releases write it.
QUANTIZATION_CONFIG = {
    "activation_scheme": "dynamic",
    "fmt": "e4m3",
    "quant_method": "fp8",
    "weight_block_size": [BLOCK, BLOCK],
}


def quantize_blocks(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(F8_E4M3 codes, float32 scales [ceil(out/128), ceil(in/128)]) of one [out, in] weight."""
    import torch

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


def is_quantized_linear(name: str) -> bool:
    """Whether tensor ``name`` is a decoder Linear's weight, which a release stores in block FP8."""
    return name.endswith(".weight") and name.removesuffix(".weight").rsplit(".", 1)[-1] in LINEARS


def write_block_fp8_checkpoint(source: Path, destination: Path) -> Path:
    """The block-FP8 release of the float checkpoint ``source`` (one file or sharded) in ``destination``."""
    from safetensors.torch import load_file, save_file

    source, destination = Path(source), Path(destination)
    shutil.copytree(source, destination, ignore=shutil.ignore_patterns("*.safetensors"))
    index_path = destination / "model.safetensors.index.json"
    index = json.loads(index_path.read_text()) if index_path.is_file() else None
    shards = sorted(set(index["weight_map"].values())) if index else ["model.safetensors"]
    for shard in shards:
        release = {}
        for name, tensor in load_file(str(source / shard)).items():
            if is_quantized_linear(name):
                module = name.removesuffix(".weight")
                release[name], release[f"{module}.weight_scale_inv"] = quantize_blocks(tensor)
                if index:
                    index["weight_map"][f"{module}.weight_scale_inv"] = shard
            else:
                release[name] = tensor
        save_file(release, str(destination / shard), metadata={"format": "pt"})
        del release
    if index:
        index_path.write_text(json.dumps(index, indent=2))
    config = json.loads((destination / "config.json").read_text())
    config["quantization_config"] = dict(QUANTIZATION_CONFIG)
    (destination / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return destination
