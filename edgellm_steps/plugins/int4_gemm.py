"""``trt::Int4GroupwiseGemmPlugin``: y = x @ W^T with W stored as packed symmetric int4.

Inputs (contract section 3.5): ``x`` float16 [..., K]; ``weight`` int8 [N/2, K]
holding two 4-bit codes per byte; ``scales`` float16 [K/group, N]. INT attributes
``gemm_n``, ``gemm_k``, ``group_size`` (128). Codes are ``q + 8`` for q in
[-8, 7] (zero point 8). Packing, our documented choice: byte [r, k] holds row
2r of W in its low nibble and row 2r+1 in its high nibble.
W[n, k] = (code[n, k] - 8) * scales[k // group, n].
"""

from __future__ import annotations

import numpy as np
from onnx.reference.op_run import OpRun

from edgellm_steps.onnx_builder import PLUGIN_DOMAIN, GraphBuilder

OP_TYPE = "Int4GroupwiseGemmPlugin"
GROUP_SIZE = 128
ZERO_POINT = 8


def pack_int4(q: np.ndarray) -> np.ndarray:
    """Signed int4 values q [N, K] (in [-8, 7]) -> packed int8 [N/2, K]."""
    if q.shape[0] % 2:
        raise ValueError(f"int4 packing needs an even number of output rows, got {q.shape[0]}")
    codes = (q.astype(np.int16) + ZERO_POINT).astype(np.uint8)
    return (codes[0::2] | (codes[1::2] << 4)).view(np.int8)


def unpack_int4(packed: np.ndarray) -> np.ndarray:
    """Packed int8 [N/2, K] -> signed int4 values [N, K] as int8."""
    raw = packed.view(np.uint8)
    codes = np.empty((raw.shape[0] * 2, raw.shape[1]), dtype=np.uint8)
    codes[0::2] = raw & 0x0F
    codes[1::2] = raw >> 4
    return codes.astype(np.int8) - ZERO_POINT


def emit_int4_gemm(g: GraphBuilder, name: str, x: str, weight: str, scales: str, *, n: int, k: int) -> str:
    return g.op(OP_TYPE, [x, weight, scales], name, domain=PLUGIN_DOMAIN, gemm_n=n, gemm_k=k, group_size=GROUP_SIZE)


def int4_gemm_reference(x: np.ndarray, weight: np.ndarray, scales: np.ndarray, *, group_size: int) -> np.ndarray:
    q = unpack_int4(weight).astype(np.float32)
    per_element = np.repeat(scales.astype(np.float32).T, group_size, axis=1)
    w = (q * per_element).astype(np.float16).astype(np.float32)
    return (x.astype(np.float32) @ w.T).astype(x.dtype)


class Int4GroupwiseGemmPluginOp(OpRun):
    """``onnx.reference`` binding of :func:`int4_gemm_reference`."""

    op_domain = PLUGIN_DOMAIN

    def _run(self, x, weight, scales, gemm_n=None, gemm_k=None, group_size=None):
        if weight.shape != (gemm_n // 2, gemm_k) or scales.shape != (gemm_k // group_size, gemm_n):
            raise ValueError(
                f"{OP_TYPE}: weight {weight.shape} / scales {scales.shape} disagree with N={gemm_n}, K={gemm_k}"
            )
        return (int4_gemm_reference(x, weight, scales, group_size=group_size),)


Int4GroupwiseGemmPluginOp.__name__ = OP_TYPE
