"""Linear layers in the precisions of contract section 3.5, from ModelOpt's calibrated quantizers.

The quantized checkpoint keeps float weights (smoothing and AWQ scales folded
in) and, per Linear, the quantizers' tensors: ``weight_quantizer._amax``,
``input_quantizer._amax``, ``input_quantizer._pre_quant_scale``. Here the
weights are quantized exactly as ModelOpt's fake quantizers do it (same scale,
rounding and clamping) and the graph carries what TensorRT's strongly typed
build reads:

- fp8: FP8 weights -> DequantizeLinear; activations through an FP8 Q/DQ pair.
- int8_sq: x * smoothing scale -> int8 Q/DQ (per tensor); int8 weights per output channel -> DQ.
- int4_awq: x * AWQ scale -> ``trt::Int4GroupwiseGemmPlugin`` with packed weights.
- int4_gptq: a GPTQ checkpoint's codes and scales, repacked for the same plugin.
- nvfp4: FP4 weights [N, K] with E4M3 block scales -> two DequantizeLinear (scales, then
  blocks of 16) -> Transpose; activations through ``trt::TRT_FP4DynamicQuantize`` and the
  same two dequantizes. Both paths dequantize to float32 and cast to float16 for the MatMul.
  A ModelOpt unified export's NVFP4 codes and scales are taken as stored.

A unified export (``quant/unified.py``) is read through the same names: its weights dequantized
exactly, so the codes computed here are the stored ones.

Every quantized Linear first multiplies its input by ``_pre_quant_scale`` when
ModelOpt calibrated one (SmoothQuant, AWQ; also an fp8 lm_head under AWQ).
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from functools import partial

import numpy as np
import torch
from onnx import TensorProto

from edgellm_steps.artifacts.checkpoint import TensorStore
from edgellm_steps.graph.onnx_builder import GraphBuilder
from edgellm_steps.graph.weight_streams import CHUNK_ELEMENTS, fp16_transposed_chunks, transposed_chunks
from edgellm_steps.plugins.fp4_quantize import emit_fp4_dynamic_quantize
from edgellm_steps.plugins.int4_gemm import ROW_GROUP, emit_int4_gemm, pack_int4
from edgellm_steps.quant import nvfp4
from edgellm_steps.quant.formats import FORMATS, FP8_E4M3_MAX, INT4_GROUP_SIZE, INT4_MAX, INT8_MAX, NVFP4_BLOCK_SIZE
from edgellm_steps.quant.gptq import gptq_codes
from edgellm_steps.quant.unified import UnifiedStore


def _fp16(value: torch.Tensor) -> np.ndarray:
    return value.to(torch.float16).numpy()


def _codes(part: torch.Tensor, multiplier: torch.Tensor, bound: float) -> torch.Tensor:
    """Integer codes exactly as ModelOpt's fake quantizer computes them: round(x * bound / amax), clamped.

    Codes use the float32 multiplier; only the stored dequantization scale is
    rounded to float16. Rounding the scale first would flip codes that sit at
    a rounding boundary, each a full quantization step away from the reference.
    """
    return torch.round(part.to(torch.float32) * multiplier).clamp(-bound - 1, bound)


def _fp8_bytes(part: torch.Tensor, multiplier: torch.Tensor) -> np.ndarray:
    scaled = (part.to(torch.float32) * multiplier).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX)
    return scaled.to(torch.float8_e4m3fn).contiguous().view(torch.uint8).numpy()


def _activation_qdq(g: GraphBuilder, x: str, path: str, scale: np.ndarray, zero_point: str) -> str:
    scale_name = g.constant(scale, "act_scale")
    quantized = g.op("QuantizeLinear", [x, scale_name, zero_point], f"{path}/input_quantizer/QuantizeLinear")
    return g.op("DequantizeLinear", [quantized, scale_name, zero_point], f"{path}/input_quantizer/DequantizeLinear")


def _pre_quant_scale(g: GraphBuilder, store: TensorStore, module: str, x: str, path: str) -> str:
    name = f"{module}.input_quantizer._pre_quant_scale"
    if name not in store:
        return x
    scale = g.weight(name, store.get(name).to(torch.float16).numpy())
    return g.op("Mul", [x, scale], f"{path}/input_quantizer/Mul")


def fp8_linear(g: GraphBuilder, store: TensorStore, module: str, path: str, x: str, weight: torch.Tensor) -> str:
    w_amax = store.get(f"{module}.weight_quantizer._amax").float().reshape(())
    a_amax = store.get(f"{module}.input_quantizer._amax").float().reshape(())
    rows, cols = weight.shape
    w_q = g.weight_chunks(
        f"{module}.weight",
        np.uint8,
        (cols, rows),
        transposed_chunks(weight, lambda part: _fp8_bytes(part, FP8_E4M3_MAX / w_amax)),
        elem_type=TensorProto.FLOAT8E4M3FN,
    )
    fp8_zero = g.typed_constant(TensorProto.FLOAT8E4M3FN, 0.0, hint="fp8_zero")
    w_scale_name = g.constant(_fp16(w_amax / FP8_E4M3_MAX), "weight_scale")
    w_dq = g.op("DequantizeLinear", [w_q, w_scale_name, fp8_zero], f"{path}/weight_quantizer/DequantizeLinear")
    x_s = _pre_quant_scale(g, store, module, x, path)
    x_dq = _activation_qdq(g, x_s, path, _fp16(a_amax / FP8_E4M3_MAX), fp8_zero)
    return g.op("MatMul", [x_dq, w_dq], f"{path}/MatMul")


def int8_sq_linear(g: GraphBuilder, store: TensorStore, module: str, path: str, x: str, weight: torch.Tensor) -> str:
    w_amax = store.get(f"{module}.weight_quantizer._amax").float().reshape(-1)
    a_amax = store.get(f"{module}.input_quantizer._amax").float().reshape(())
    rows, cols = weight.shape
    multiplier = (INT8_MAX / w_amax)[None, :]

    def quantize(part: torch.Tensor) -> np.ndarray:
        return _codes(part, multiplier, INT8_MAX).to(torch.int8).contiguous().numpy()

    w_q = g.weight_chunks(f"{module}.weight", np.int8, (cols, rows), transposed_chunks(weight, quantize))
    int8_zero = g.constant(np.array(0, dtype=np.int8), "int8_zero")
    int8_zeros = g.constant(np.zeros(rows, dtype=np.int8), "int8_zeros")
    w_scale_name = g.weight(f"{module}.weight_quantizer.scale", _fp16(w_amax / INT8_MAX))
    w_dq = g.op(
        "DequantizeLinear", [w_q, w_scale_name, int8_zeros], f"{path}/weight_quantizer/DequantizeLinear", axis=1
    )
    x_s = _pre_quant_scale(g, store, module, x, path)
    x_dq = _activation_qdq(g, x_s, path, _fp16(a_amax / INT8_MAX), int8_zero)
    return g.op("MatMul", [x_dq, w_dq], f"{path}/MatMul")


def _int4_chunks(weight: torch.Tensor, amax: torch.Tensor) -> list[Callable[[], np.ndarray]]:
    """The plugin's packed int4 weight, whole row groups at a time, as conversions still to run.

    A row group's packed words depend on its own rows only and are contiguous in the packed tensor,
    so the slices concatenate to the packing of the whole weight."""
    rows, cols = weight.shape
    step = max(ROW_GROUP, CHUNK_ELEMENTS // max(cols, 1) // ROW_GROUP * ROW_GROUP)

    def pack(first: int, last: int) -> np.ndarray:
        multiplier = (INT4_MAX / amax[first:last]).repeat_interleave(INT4_GROUP_SIZE, dim=1)
        return pack_int4(_codes(weight[first:last], multiplier, INT4_MAX).to(torch.int8).numpy())

    return [partial(pack, first, min(first + step, rows)) for first in range(0, rows, step)]


def int4_awq_linear(g: GraphBuilder, store: TensorStore, module: str, path: str, x: str, weight: torch.Tensor) -> str:
    rows, cols = weight.shape
    amax = store.get(f"{module}.weight_quantizer._amax").float().reshape(rows, cols // INT4_GROUP_SIZE)
    packed = g.weight_chunks(f"{module}.weight", np.int8, (rows // 2, cols), _int4_chunks(weight, amax))
    scales = g.weight(f"{module}.weight_quantizer.scale", _fp16((amax / INT4_MAX).t().contiguous()))
    x_s = _pre_quant_scale(g, store, module, x, path)
    return emit_int4_gemm(g, f"{path}/Int4GroupwiseGemmPlugin", x_s, packed, scales, n=rows, k=cols)


def _nvfp4_dequantize(g: GraphBuilder, codes: str, block_scales: str, global_scale: np.float32, path: str) -> str:
    """Two-level dequantize: E4M3 block scales x global scale, then FP4 codes x block scale (float32)."""
    scale = g.op(
        "DequantizeLinear", [block_scales, g.constant(global_scale, "fp4_global_scale")], f"{path}/DequantizeLinear"
    )
    return g.op("DequantizeLinear", [codes, scale], f"{path}/DequantizeLinear_1", axis=-1, block_size=NVFP4_BLOCK_SIZE)


class _Nvfp4Slices:
    """FP4 codes and E4M3 block scales of ``weight`` [N, K], a slice of rows at a time, as conversions still to run.

    One quantization gives both a slice's codes and its scales, but the codes tensor is written whole
    before the scales tensor. So each codes conversion quantizes its slice and hands the scales to a
    future; the scales conversions wait on those futures. A pipelined writer starts conversions in the
    order handed over, so every codes conversion has started before any scales conversion waits.
    """

    def __init__(self, weight: torch.Tensor, gs: np.float32) -> None:
        self.weight, self.gs = weight, gs
        step = max(1, CHUNK_ELEMENTS // max(weight.shape[1], 1))
        self.slices = [(first, min(first + step, weight.shape[0])) for first in range(0, weight.shape[0], step)]
        self.scales: list[Future] = [Future() for _ in self.slices]

    def _codes(self, index: int) -> np.ndarray:
        first, last = self.slices[index]
        try:
            blocks = nvfp4.quantize_scaled(self.weight[first:last].to(torch.float32).numpy(), self.gs)
        except BaseException as err:
            self.scales[index].set_exception(err)
            raise
        self.scales[index].set_result(blocks.block_scales.view(np.uint8))
        return nvfp4.pack_codes(blocks.codes)

    def codes(self) -> list[Callable[[], np.ndarray]]:
        return [partial(self._codes, index) for index in range(len(self.slices))]

    def block_scales(self) -> list[Callable[[], np.ndarray]]:
        return [future.result for future in self.scales]


def nvfp4_linear(g: GraphBuilder, store: TensorStore, module: str, path: str, x: str, weight: torch.Tensor) -> str:
    rows, cols = weight.shape
    if cols % NVFP4_BLOCK_SIZE:
        raise ValueError(f"{module}: nvfp4 needs an input dim that is a multiple of {NVFP4_BLOCK_SIZE}, got {cols}")
    a_scale = nvfp4.global_scale(float(store.get(f"{module}.input_quantizer._amax").float().max()))
    stored = store.fp4_blocks(module) if isinstance(store, UnifiedStore) else None
    if stored is not None and tuple(stored[0].shape) == (rows, cols // 2):
        # A unified export's codes and block scales, byte for byte, under its own second-level scale.
        packed, block_bytes, second = stored
        w_scale, chunks, scales = np.float32(second.item()), [packed.numpy()], [block_bytes.numpy()]
    else:
        w_scale = nvfp4.global_scale(float(store.get(f"{module}.weight_quantizer._amax").float().max()))
        slices = _Nvfp4Slices(weight, w_scale)
        chunks, scales = slices.codes(), slices.block_scales()
    codes = g.weight_chunks(
        f"{module}.weight", np.uint8, (rows, cols // 2), chunks, elem_type=TensorProto.FLOAT4E2M1, dims=(rows, cols)
    )
    block_scales = g.weight_chunks(
        f"{module}.weight_quantizer.block_scale",
        np.uint8,
        (rows, cols // NVFP4_BLOCK_SIZE),
        scales,
        elem_type=TensorProto.FLOAT8E4M3FN,
    )
    w = _nvfp4_dequantize(g, codes, block_scales, w_scale, f"{path}/weight_quantizer")
    w = g.op("Transpose", [w], f"{path}/weight_quantizer/Transpose", perm=[1, 0])
    w = g.op("Cast", [w], f"{path}/weight_quantizer/Cast", to=TensorProto.FLOAT16)
    x_s = _pre_quant_scale(g, store, module, x, path)
    a_codes, a_scales = emit_fp4_dynamic_quantize(
        g, f"{path}/input_quantizer/TRT_FP4DynamicQuantize", x_s, g.constant(a_scale, "fp4_global_scale")
    )
    x_dq = _nvfp4_dequantize(g, a_codes, a_scales, a_scale, f"{path}/input_quantizer")
    x_dq = g.op("Cast", [x_dq], f"{path}/input_quantizer/Cast", to=TensorProto.FLOAT16)
    return g.op("MatMul", [x_dq, w], f"{path}/MatMul")


def gptq_linear(g: GraphBuilder, store: TensorStore, module: str, path: str, x: str, gptq: dict) -> str:
    q, scales = gptq_codes(store, module, gptq)
    rows, cols = q.shape
    packed = g.weight(f"{module}.weight", pack_int4(q))
    scale_name = g.weight(f"{module}.weight_quantizer.scale", scales)
    return emit_int4_gemm(g, f"{path}/Int4GroupwiseGemmPlugin", x, packed, scale_name, n=rows, k=cols)


def emit_linear(
    g: GraphBuilder, store: TensorStore, module: str, path: str, x: str, weight: torch.Tensor, fmt: str | None
) -> str:
    """The MatMul (or plugin) of one Linear in format ``fmt`` (None: float16); bias is the caller's."""
    if fmt is not None:
        return EMITTERS[FORMATS[fmt].onnx_emitter](g, store, module, path, x, weight)
    rows, cols = weight.shape
    name = g.weight_chunks(f"{module}.weight", np.float16, (cols, rows), fp16_transposed_chunks(weight))
    return g.op("MatMul", [x, name], f"{path}/MatMul")


#: Emitters of the formats quantized from float weights, by the format table's ``onnx_emitter``.
EMITTERS = {"fp8": fp8_linear, "int8_sq": int8_sq_linear, "int4_awq": int4_awq_linear, "nvfp4": nvfp4_linear}
#: Emitters of the formats a checkpoint holds: codes read from the checkpoint with its quantization config.
HELD_EMITTERS = {"gptq": gptq_linear}
