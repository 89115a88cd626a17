"""Writing GPTQ-format checkpoints for tests: round-to-nearest int4 codes in GPTQ's packed layout.

The GPTQ algorithm only chooses codes; the format is what the exporter reads, so
RTN codes packed the GPTQ way exercise the same path. The dequantized weights
are also written as a float checkpoint: the reference the export must match.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

GROUP = 128
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _pack(codes: torch.Tensor, dim: int) -> torch.Tensor:
    """uint8 codes -> int32 words of eight 4-bit codes along ``dim``."""
    codes = codes.to(torch.int64)
    words = torch.zeros_like(codes.narrow(dim, 0, codes.shape[dim] // 8))
    for i in range(8):
        words |= codes.index_select(dim, torch.arange(i, codes.shape[dim], 8)) << (4 * i)
    signed = (words + 2**31) % 2**32 - 2**31  # the same 32 bits, as int32
    return signed.to(torch.int32).contiguous()


def write_gptq_checkpoint(source: Path, gptq_dir: Path, dequantized_dir: Path, *, zero: int = 8) -> None:
    tensors = load_file(str(source / "model.safetensors"))
    packed, dequantized = {}, {}
    for name, tensor in tensors.items():
        module = name.removesuffix(".weight")
        if not (name.endswith(".weight") and module.rsplit(".", 1)[-1] in LINEARS):
            packed[name] = dequantized[name] = tensor
            continue
        w = tensor.float().t()  # [K, N]
        k, n = w.shape
        groups = w.reshape(k // GROUP, GROUP, n)
        scales = (groups.abs().amax(dim=1) / 7).clamp(min=1e-8).to(torch.float16)  # [K/g, N]
        per_row = scales.float().repeat_interleave(GROUP, dim=0)
        codes = (torch.round(w / per_row).clamp(-8, 7) + zero).clamp(0, 15).to(torch.uint8)
        zeros = torch.full((k // GROUP, n), zero - 1, dtype=torch.uint8)  # classic format: zero - 1
        packed[f"{module}.qweight"] = _pack(codes, 0)
        packed[f"{module}.qzeros"] = _pack(zeros, 1)
        packed[f"{module}.scales"] = scales
        packed[f"{module}.g_idx"] = torch.arange(k, dtype=torch.int32) // GROUP
        dequantized[name] = ((codes.float() - zero) * per_row).t().contiguous().to(tensor.dtype)
    for directory, weights in ((gptq_dir, packed), (dequantized_dir, dequantized)):
        shutil.copytree(source, directory, ignore=shutil.ignore_patterns("*.safetensors"))
        save_file(weights, str(directory / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((gptq_dir / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "gptq",
        "bits": 4,
        "group_size": GROUP,
        "desc_act": False,
        "sym": True,
        "checkpoint_format": "gptq",
    }
    (gptq_dir / "config.json").write_text(json.dumps(config, indent=2))
