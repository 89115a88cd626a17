"""Pre-quantized GPTQ checkpoints (``quantization_config.quant_method: gptq``), exported as int4.

The GPTQ layout per Linear: ``qweight`` int32 [K/8, N] (eight 4-bit codes along K,
code i of a word in bits 4i..4i+3), ``qzeros`` int32 [K/group, N/8] (packed along N;
the classic ``gptq`` format stores zero - 1, ``gptq_v2`` the zero itself), ``scales``
float16 [K/group, N], ``g_idx`` int32 [K]. Weight W[k, n] = (code - zero) * scale.
The int4 plugin takes symmetric weights (zero 8) in groups of 128 consecutive
inputs, so asymmetric or act-order checkpoints are refused with the reason.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from edgellm_steps.artifacts.checkpoint import TensorStore
from edgellm_steps.errors import SourceError
from edgellm_steps.quant.formats import INT4_GROUP_SIZE, INT4_ZERO_POINT


def gptq_config(hf_config: dict[str, Any]) -> dict[str, Any] | None:
    """The checkpoint's GPTQ quantization config, or None for any other checkpoint."""
    quant = hf_config.get("quantization_config") or {}
    return quant if quant.get("quant_method") == "gptq" else None


def check_gptq_config(quant: dict[str, Any], *, where: str) -> None:
    """Refuse GPTQ variants the int4 plugin cannot run, naming the setting."""
    problems = []
    if quant.get("bits", 4) != 4:
        problems.append(f"bits {quant.get('bits')} (needs 4)")
    if quant.get("group_size", INT4_GROUP_SIZE) != INT4_GROUP_SIZE:
        problems.append(f"group_size {quant.get('group_size')} (needs {INT4_GROUP_SIZE})")
    if quant.get("desc_act", False):
        problems.append("desc_act true (act-order is not supported)")
    if not quant.get("sym", True):
        problems.append("sym false (needs symmetric weights)")
    if problems:
        raise SourceError(f"{where}: GPTQ checkpoint with {', '.join(problems)}; re-quantize it or use int4_awq")


#: 4-bit codes per int32 word of ``qweight`` and ``qzeros``.
_CODES_PER_WORD = 8


def _unpack_rows(words: np.ndarray) -> np.ndarray:
    """int32 [R, C] holding 8 codes each along rows -> uint8 [8R, C]."""
    raw = words.view(np.uint32)
    codes = np.empty((raw.shape[0] * _CODES_PER_WORD, raw.shape[1]), dtype=np.uint8)
    for i in range(_CODES_PER_WORD):
        codes[i::_CODES_PER_WORD] = (raw >> (4 * i)) & 0xF
    return codes


def _unpack_cols(words: np.ndarray) -> np.ndarray:
    """int32 [R, C] holding 8 codes each along columns -> uint8 [R, 8C]."""
    raw = words.view(np.uint32)
    codes = np.empty((raw.shape[0], raw.shape[1] * _CODES_PER_WORD), dtype=np.uint8)
    for i in range(_CODES_PER_WORD):
        codes[:, i::_CODES_PER_WORD] = (raw >> (4 * i)) & 0xF
    return codes


def gptq_codes(store: TensorStore, module: str, quant: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """(signed int4 values [N, K] as int8, float16 scales [K/group, N]) of one GPTQ Linear."""
    import torch

    codes = _unpack_rows(store.get(f"{module}.qweight").numpy())  # [K, N]
    scales = store.get(f"{module}.scales").to(torch.float16).numpy()
    offset = 0 if quant.get("checkpoint_format") == "gptq_v2" else 1
    zeros = _unpack_cols(store.get(f"{module}.qzeros").numpy()).astype(np.int16) + offset
    k = codes.shape[0]
    if f"{module}.g_idx" in store:
        g_idx = store.get(f"{module}.g_idx").numpy()
        if not np.array_equal(g_idx, np.arange(k) // INT4_GROUP_SIZE):
            raise SourceError(
                f"{module}: g_idx is not k // {INT4_GROUP_SIZE} (act-order); re-quantize without desc_act"
            )
    if not (zeros == INT4_ZERO_POINT).all():
        raise SourceError(
            f"{module}: GPTQ zero points are not all {INT4_ZERO_POINT} (asymmetric); use int4_awq instead"
        )
    return (codes.astype(np.int16) - INT4_ZERO_POINT).astype(np.int8).T.copy(), scales
