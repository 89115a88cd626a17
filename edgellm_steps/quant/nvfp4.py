"""NVFP4: E2M1 values in blocks of 16, each block scaled by an E4M3 scale, times one float32 scale.

One definition of the format serves three users, so that they cannot drift apart:

- the export, which stores weights as FP4 codes with their two scales;
- ``trt::TRT_FP4DynamicQuantize``'s CPU implementation, which quantizes activations in the graph;
- :func:`cpu_fake_quantization`, which lets ModelOpt's NVFP4 quantizers run on a CPU.

The arithmetic is ModelOpt's fake quantizer's (checked against its CUDA kernel by
``tests/test_cuda.py``), all in float32:

- ``global_scale = amax / (6 * 448)`` from the calibrated amax;
- a block's scale is ``e4m3(min(block_amax / (6 * global_scale), 448)) * global_scale``,
  replaced by 1 when it is below 1e-5 (such a block holds only zeros after rounding);
- a value becomes ``sign * e2m1(|x| / block_scale) * block_scale``, rounding to nearest with
  ties to the even code, and saturating at 6.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import ml_dtypes
import numpy as np

from edgellm_steps.quant.formats import FP4_E2M1_MAX, FP8_E4M3_MAX, NVFP4_BLOCK_SIZE

#: ModelOpt's guard: a dequantized block scale below this is replaced by 1.
MIN_BLOCK_SCALE = 1e-5


def global_scale(amax: float) -> np.float32:
    """The per-tensor second-level scale, ``amax / (6 * 448)`` (1 for an all-zero tensor)."""
    amax = np.float32(amax)
    return np.float32(amax / np.float32(FP4_E2M1_MAX * FP8_E4M3_MAX)) if amax > 0 else np.float32(1.0)


@dataclass(frozen=True)
class Nvfp4Blocks:
    """A tensor [..., K] in NVFP4: codes [..., K] (E2M1), block scales [..., K/16] (E4M3), global scale."""

    codes: np.ndarray
    block_scales: np.ndarray
    global_scale: np.float32

    def dequantize(self) -> np.ndarray:
        scale = self.block_scales.astype(np.float32) * self.global_scale
        return self.codes.astype(np.float32) * np.repeat(scale, NVFP4_BLOCK_SIZE, axis=-1)


def quantize(x: np.ndarray, amax: float) -> Nvfp4Blocks:
    """Quantize ``x`` [..., K] (K a multiple of 16) with the calibrated ``amax``."""
    return quantize_scaled(x, global_scale(amax))


def quantize_scaled(x: np.ndarray, gs: np.float32) -> Nvfp4Blocks:
    """Quantize ``x`` [..., K] with the second-level scale ``gs`` (what the graph stores)."""
    x = np.asarray(x, dtype=np.float32)
    if x.shape[-1] % NVFP4_BLOCK_SIZE:
        raise ValueError(f"NVFP4 needs a last dimension that is a multiple of {NVFP4_BLOCK_SIZE}, got {x.shape[-1]}")
    gs = np.float32(gs)
    blocks = x.reshape(*x.shape[:-1], x.shape[-1] // NVFP4_BLOCK_SIZE, NVFP4_BLOCK_SIZE)
    block_amax = np.abs(blocks).max(axis=-1)
    in_range = np.minimum(block_amax / (np.float32(FP4_E2M1_MAX) * gs), np.float32(FP8_E4M3_MAX))
    block_scales = in_range.astype(ml_dtypes.float8_e4m3fn)
    scale = block_scales.astype(np.float32) * gs
    scale = np.where(scale >= np.float32(MIN_BLOCK_SCALE), scale, np.float32(1.0))[..., None]
    magnitude = np.minimum(np.abs(blocks) / scale, np.float32(FP4_E2M1_MAX))
    codes = (np.sign(blocks) * magnitude.astype(ml_dtypes.float4_e2m1fn).astype(np.float32)).reshape(x.shape)
    return Nvfp4Blocks(codes.astype(ml_dtypes.float4_e2m1fn), block_scales, gs)


def fake_quantize(x: np.ndarray, amax: float) -> np.ndarray:
    """``x`` rounded through NVFP4 and back, in float32."""
    return quantize(x, amax).dequantize()


def pack_codes(codes: np.ndarray) -> np.ndarray:
    """E2M1 codes [..., K] -> bytes [..., K/2], element 2i in the low nibble (ONNX's FLOAT4E2M1 layout)."""
    nibbles = codes.view(np.uint8) & 0x0F
    return nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)


def _is_nvfp4(num_bits: int, exponent_bits: int, scale_num_bits: int, scale_exponent_bits: int) -> bool:
    return (num_bits, exponent_bits, scale_num_bits, scale_exponent_bits) == (4, 2, 8, 4)


@contextlib.contextmanager
def cpu_fake_quantization() -> Iterator[None]:
    """Let ModelOpt's NVFP4 quantizers run on CPU tensors within the block.

    ModelOpt fake-quantizes NVFP4 with a CUDA kernel only. Inside this block its
    dynamic-block-quantize op is routed to :func:`fake_quantize` for CPU tensors in
    NVFP4; every other call goes to ModelOpt unchanged. Nothing is saved with a model.

    Without ModelOpt imported there is no ModelOpt quantizer to route (a float reference), and the block
    does nothing: importing ModelOpt costs 12-15 s, which a verify of an fp16 export need not pay.
    """
    import sys

    if "modelopt.torch.quantization" not in sys.modules:
        yield
        return
    import torch
    from modelopt.torch.quantization import tensor_quant

    original = tensor_quant.dynamic_block_quantize_op

    def routed(inputs, block_size, amax, num_bits, exponent_bits, scale_num_bits, scale_exponent_bits):
        nvfp4 = _is_nvfp4(num_bits, exponent_bits, scale_num_bits, scale_exponent_bits)
        if inputs.is_cuda or not nvfp4 or block_size != NVFP4_BLOCK_SIZE or amax is None:
            return original(inputs, block_size, amax, num_bits, exponent_bits, scale_num_bits, scale_exponent_bits)
        values = fake_quantize(inputs.detach().float().numpy(), float(amax.float().max()))
        return torch.from_numpy(values).to(inputs.dtype)

    tensor_quant.dynamic_block_quantize_op = routed
    try:
        yield
    finally:
        tensor_quant.dynamic_block_quantize_op = original
