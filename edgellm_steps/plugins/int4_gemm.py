"""``trt::Int4GroupwiseGemmPlugin``: y = x @ W^T with W stored as packed symmetric int4.

Inputs (contract section 3.5): ``x`` float16 [..., K]; ``weight`` int8 [N/2, K]
holding four 4-bit codes per 16-bit word; ``scales`` float16 [K/group, N]. INT
attributes ``gemm_n``, ``gemm_k``, ``group_size`` (128). Codes are ``u = q + 8``
for q in [-8, 7] (zero point 8), and W[n, k] = (u[n, k] - 8) * scales[k // group, n].

The weight layout is the one the plugin's kernels read (contract 3.5, "Int4 weight
layout"); any other arrangement of the same bytes builds fine and computes garbage on
the device, so :func:`pack_int4` reproduces it exactly and :func:`unpack_int4` is its
inverse, which keeps the CPU reference honest about what the device will see:

* columns are permuted inside each block of 32: final column ``a*8 + e*4 + d``
  (a, d in 0..3, e in 0..1) holds original column ``d*8 + a*2 + e``
  (:data:`COLUMN_PERMUTATION`; the contract gives it as two successive shuffles);
* rows go in groups of four and columns in blocks of 64: the 4 x 64 permuted codes of
  group g, block j, taken row by row, fill the 16-bit words ``w[g, 64j .. 64j+63]``
  four codes per word, the first code in the lowest nibble. Word ``w[g, 64j + p]``
  therefore holds row ``4g + p // 16``, permuted columns ``64j + 4 * (p % 16)`` .. +3;
* the int16 array w [N/4, K], as little-endian bytes, is the int8 initializer [N/2, K].

Hence N must be a multiple of 4 and K a multiple of 64.
"""

from __future__ import annotations

import numpy as np
from onnx.reference.op_run import OpRun

from edgellm_steps.graph.onnx_builder import PLUGIN_DOMAIN, GraphBuilder
from edgellm_steps.quant.formats import INT4_GROUP_SIZE, INT4_ROW_GROUP, INT4_ZERO_POINT

OP_TYPE = "Int4GroupwiseGemmPlugin"

#: Rows per packed 16-bit word and columns per packing block (contract 3.5).
ROW_GROUP = INT4_ROW_GROUP
COLUMN_BLOCK = 64


def _column_permutation() -> np.ndarray:
    """Composition of the contract's two column shuffles within a 32-column block.

    Step 1: column ``a*8 + b*2 + c`` takes ``b*8 + a*2 + c``; step 2: inside each group of 8,
    position ``e*4 + d`` takes ``d*2 + e``. Entry f is the original column that ends at f.
    """
    step1 = np.empty(32, dtype=np.intp)
    for a in range(4):
        for b in range(4):
            for c in range(2):
                step1[a * 8 + b * 2 + c] = b * 8 + a * 2 + c
    step2 = np.array([(f // 8) * 8 + (f % 4) * 2 + (f % 8) // 4 for f in range(32)], dtype=np.intp)
    return step1[step2]


#: ``COLUMN_PERMUTATION[f]`` is the original column (within a block of 32) stored at column f.
COLUMN_PERMUTATION = _column_permutation()
_INVERSE_COLUMN_PERMUTATION = np.argsort(COLUMN_PERMUTATION)


def _check_shape(n: int, k: int) -> None:
    if n % ROW_GROUP or k % COLUMN_BLOCK:
        raise ValueError(
            f"int4 plugin layout needs N (output rows) a multiple of {ROW_GROUP} and K (input columns) "
            f"a multiple of {COLUMN_BLOCK}, got N={n}, K={k}"
        )


def pack_int4(q: np.ndarray) -> np.ndarray:
    """Signed int4 values q [N, K] (in [-8, 7]) -> int8 [N/2, K] in the plugin's layout."""
    if q.ndim != 2:
        raise ValueError(f"int4 packing needs a 2-D [N, K] weight, got shape {q.shape}")
    n, k = q.shape
    _check_shape(n, k)
    codes = (np.asarray(q).astype(np.int16) + INT4_ZERO_POINT).astype(np.uint16)
    shuffled = codes.reshape(n, k // 32, 32)[:, :, COLUMN_PERMUTATION]
    # [g, r, j, c] -> [g, j, r, c]: each (g, j) tile read row by row, four codes per word.
    tiles = shuffled.reshape(n // ROW_GROUP, ROW_GROUP, k // COLUMN_BLOCK, COLUMN_BLOCK).transpose(0, 2, 1, 3)
    quads = tiles.reshape(n // ROW_GROUP, k // COLUMN_BLOCK, COLUMN_BLOCK, 4)
    words = quads[..., 0] | (quads[..., 1] << 4) | (quads[..., 2] << 8) | (quads[..., 3] << 12)
    little_endian = np.ascontiguousarray(words.reshape(n // ROW_GROUP, k), dtype="<u2")
    return little_endian.view(np.uint8).reshape(n // 2, k).view(np.int8)


def unpack_int4(packed: np.ndarray) -> np.ndarray:
    """int8 [N/2, K] in the plugin's layout -> signed int4 values [N, K] as int8 (inverse of pack_int4)."""
    if packed.ndim != 2:
        raise ValueError(f"int4 unpacking needs a 2-D [N/2, K] weight, got shape {packed.shape}")
    n, k = packed.shape[0] * 2, packed.shape[1]
    _check_shape(n, k)
    words = np.ascontiguousarray(packed).view(np.uint8).reshape(-1).view("<u2").astype(np.uint16)
    words = words.reshape(n // ROW_GROUP, k // COLUMN_BLOCK, COLUMN_BLOCK, 1)
    quads = (words >> np.array([0, 4, 8, 12], dtype=np.uint16)) & 0x0F
    tiles = quads.reshape(n // ROW_GROUP, k // COLUMN_BLOCK, ROW_GROUP, COLUMN_BLOCK).transpose(0, 2, 1, 3)
    shuffled = tiles.reshape(n, k // 32, 32)
    codes = shuffled[:, :, _INVERSE_COLUMN_PERMUTATION].reshape(n, k)
    return codes.astype(np.int8) - INT4_ZERO_POINT


def emit_int4_gemm(g: GraphBuilder, name: str, x: str, weight: str, scales: str, *, n: int, k: int) -> str:
    return g.op(
        OP_TYPE, [x, weight, scales], name, domain=PLUGIN_DOMAIN, gemm_n=n, gemm_k=k, group_size=INT4_GROUP_SIZE
    )


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
