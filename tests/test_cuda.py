"""Checks that need a CUDA GPU: ModelOpt's NVFP4 kernel, and calibration with --device cuda.

Skipped where torch sees no GPU (CI machines); run by hand on a GPU host with
``pytest tests/test_cuda.py``.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from edgellm_steps.export.export_llm import export_llm
from edgellm_steps.quant import nvfp4
from edgellm_steps.quant.quantize_llm import quantize_llm
from edgellm_steps.verify.verify_onnx import verify_onnx

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU (ModelOpt's NVFP4 kernel, --device cuda)"
)


def modelopt_nvfp4(x: torch.Tensor, amax: float) -> np.ndarray:
    """ModelOpt's own NVFP4 fake quantization of ``x``, on the GPU."""
    from modelopt.torch.quantization.config import QuantizerAttributeConfig
    from modelopt.torch.quantization.nn import TensorQuantizer

    config = QuantizerAttributeConfig(num_bits=(2, 1), block_sizes={-1: 16, "type": "dynamic", "scale_bits": (4, 3)})
    quantizer = TensorQuantizer(config).cuda()
    quantizer.amax = torch.tensor(amax, device="cuda")
    with torch.no_grad():
        return quantizer(x.cuda()).float().cpu().numpy()


def nvfp4_cases() -> dict[str, tuple[torch.Tensor, float]]:
    rng = np.random.default_rng(0)
    normal = rng.standard_normal((64, 256)).astype(np.float32)
    heavy = (rng.standard_t(2, (64, 256)) * 0.02).astype(np.float32)
    # Values at every E2M1 rounding boundary of a block whose scale is exactly 1.
    grid = np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0] * 2, dtype=np.float32)
    ties = np.tile(grid, (8, 16)) * np.sign(rng.standard_normal((8, 256))).astype(np.float32)
    sparse = normal * (rng.random((64, 256)) < 0.05)
    return {
        "normal": (torch.from_numpy(normal), float(np.abs(normal).max())),
        "heavy_tailed": (torch.from_numpy(heavy), float(np.abs(heavy).max())),
        "rounding_ties": (torch.from_numpy(ties), 6.0 * 448.0),
        "sparse_blocks": (torch.from_numpy(sparse), float(np.abs(sparse).max())),
        "amax_below_data": (torch.from_numpy(normal), 0.5 * float(np.abs(normal).max())),
        "float16_input": (torch.from_numpy(normal).half(), float(np.abs(normal).max())),
    }


@pytest.mark.parametrize("case", sorted(nvfp4_cases()))
def test_cpu_nvfp4_equals_modelopt_cuda_kernel(case):
    x, amax = nvfp4_cases()[case]
    expected = modelopt_nvfp4(x, amax)
    got = nvfp4.fake_quantize(x.float().numpy(), amax).astype(x.numpy().dtype).astype(np.float32)
    mismatched = np.flatnonzero(got != expected)
    assert mismatched.size == 0, (
        f"{mismatched.size} of {got.size} values differ, e.g. x={x.flatten()[mismatched[:4]].tolist()} "
        f"cpu={got.flatten()[mismatched[:4]].tolist()} cuda={expected.flatten()[mismatched[:4]].tolist()}"
    )


@pytest.mark.parametrize("precision", ["fp8", "int8_sq", "int4_awq", "nvfp4-lmnvfp4-kvfp8"])
def test_quantize_on_cuda_exports_and_verifies(checkpoint_factory, tmp_path, precision):
    base = checkpoint_factory("qwen2", hidden_size=128, intermediate_size=256)
    quantize_llm(
        base,
        tmp_path / "q",
        precision=precision,
        device="cuda",
        calib_size=16,
        calib_max_tokens=64,
    )
    export_llm(tmp_path / "q", tmp_path / "llm")
    summary = verify_onnx(tmp_path / "llm", tmp_path / "q")
    assert summary["passed"] and summary["precision"] == precision, summary


def test_quantize_on_cuda_holds_about_one_layer_in_gpu_memory(checkpoint_factory, tmp_path):
    """Layer-by-layer calibration on the GPU: the peak GPU memory is about one decoder layer (plus the cached
    hidden states and the LM head stage), not the model: 12 layers, each 1/12 of the decoder's bytes."""
    base = checkpoint_factory("qwen2", hidden_size=512, intermediate_size=2048, num_hidden_layers=12)
    config = json.loads((base / "config.json").read_text())
    hidden, inter, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    layer_bytes = 2 * (4 * hidden * hidden + 3 * hidden * inter)  # float16, GQA rounded up to full heads
    head_bytes = 2 * vocab * hidden
    torch.cuda.reset_peak_memory_stats()
    quantize_llm(base, tmp_path / "q", precision="fp8", device="cuda", calib_size=16, calib_max_tokens=64)
    peak = torch.cuda.max_memory_allocated()
    whole = 12 * layer_bytes + 2 * head_bytes
    print(f"peak GPU memory {peak / 2**20:.1f} MiB; one layer {layer_bytes / 2**20:.1f} MiB; model {whole / 2**20:.1f}")
    assert peak < 3 * max(layer_bytes, head_bytes) + 64 * 2**20 < whole
