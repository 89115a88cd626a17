"""``trt::TRT_FP4DynamicQuantize``: activations -> NVFP4 codes and per-block E4M3 scales, at run time.

Inputs: ``x`` float16 [..., K] and the float32 second-level scale ``global_scale``
(calibrated amax / (6 * 448)). Attributes: ``axis`` = -1, ``block_size`` = 16,
``scale_type`` = FLOAT8E4M3FN. Outputs: codes FLOAT4E2M1 [..., K] and block scales
FLOAT8E4M3FN [..., K/16]. The graph dequantizes them with two standard
``DequantizeLinear`` nodes (scales, then blocked codes), the form TensorRT fuses
into an FP4 GEMM. The arithmetic is :mod:`edgellm_steps.quant.nvfp4`'s.
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto
from onnx.reference.op_run import OpRun

from edgellm_steps.graph.onnx_builder import PLUGIN_DOMAIN, GraphBuilder
from edgellm_steps.quant import nvfp4
from edgellm_steps.quant.formats import NVFP4_BLOCK_SIZE

OP_TYPE = "TRT_FP4DynamicQuantize"


def emit_fp4_dynamic_quantize(g: GraphBuilder, name: str, x: str, scale: str) -> tuple[str, str]:
    """Add the quantize node; returns the names of its (codes, block scales) outputs."""
    codes, block_scales = g.node(
        OP_TYPE,
        [x, scale],
        name,
        outputs=2,
        domain=PLUGIN_DOMAIN,
        axis=-1,
        block_size=NVFP4_BLOCK_SIZE,
        scale_type=TensorProto.FLOAT8E4M3FN,
    )
    return codes, block_scales


class TRT_FP4DynamicQuantizeOp(OpRun):
    """``onnx.reference`` binding of :func:`edgellm_steps.quant.nvfp4.quantize_scaled`."""

    op_domain = PLUGIN_DOMAIN

    def _run(self, x, scale, axis=None, block_size=None, scale_type=None):
        if axis not in (-1, x.ndim - 1) or block_size != NVFP4_BLOCK_SIZE or scale_type != TensorProto.FLOAT8E4M3FN:
            raise ValueError(f"{OP_TYPE}: only axis=-1, block_size={NVFP4_BLOCK_SIZE}, E4M3 scales are implemented")
        blocks = nvfp4.quantize_scaled(x.astype(np.float32), np.float32(np.asarray(scale).reshape(())))
        return blocks.codes, blocks.block_scales


TRT_FP4DynamicQuantizeOp.__name__ = OP_TYPE
