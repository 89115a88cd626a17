"""ModelOpt recipes per precision (contract section 2), declared in one table.

A precision string maps to one ModelOpt ``quant_cfg`` list: the weight recipe
(``FP8_DEFAULT_CFG``, ``INT8_SMOOTHQUANT_CFG``, ``INT4_AWQ_CFG``,
``NVFP4_DEFAULT_CFG``), then the LM-head override, then ``FP8_KV_CFG``. Later
entries win in ModelOpt, so the order is the precedence.
"""

from __future__ import annotations

import copy
from typing import Any

from edgellm_steps.quant.precision import INT4_GROUP_SIZE, NVFP4_BLOCK_SIZE, Precision

WEIGHT_RECIPES = {
    "fp8": "FP8_DEFAULT_CFG",
    "int8_sq": "INT8_SMOOTHQUANT_CFG",
    "int4_awq": "INT4_AWQ_CFG",
    "nvfp4": "NVFP4_DEFAULT_CFG",
}

#: ModelOpt spells a float format as (exponent bits, mantissa bits).
_E4M3, _E2M1 = (4, 3), (2, 1)
_FP8 = {"num_bits": _E4M3, "axis": None}
_NVFP4 = {"num_bits": _E2M1, "block_sizes": {-1: NVFP4_BLOCK_SIZE, "type": "dynamic", "scale_bits": _E4M3}}
LM_HEAD_RECIPES: dict[str, list[dict[str, Any]]] = {
    fmt: [
        {"quantizer_name": "*lm_head*weight_quantizer", "cfg": cfg},
        {"quantizer_name": "*lm_head*input_quantizer", "cfg": cfg},
    ]
    for fmt, cfg in (("fp8", _FP8), ("nvfp4", _NVFP4))
}

#: Calibration batch size per weight format (the classic tool's defaults).
CALIBRATION_BATCH = {"int4_awq": 16}

#: Formats that quantize GEMM inputs in blocks, and the block size: input dims must be multiples of it.
BLOCK_SIZES = {"int4_awq": INT4_GROUP_SIZE, "int4_gptq": INT4_GROUP_SIZE, "nvfp4": NVFP4_BLOCK_SIZE}
#: Weight formats stored through ``trt::Int4GroupwiseGemmPlugin``.
INT4_FORMATS = ("int4_awq", "int4_gptq")


def modelopt_config(precision: Precision, exclude: tuple[str, ...] = ()) -> dict[str, Any]:
    """The ModelOpt quantization config for ``precision`` (fp16 weights quantize nothing but the overrides).

    ``exclude``: quantizer name patterns disabled last, so no recipe entry re-enables them.
    """
    import modelopt.torch.quantization as mtq

    if precision.weights in WEIGHT_RECIPES:
        config = copy.deepcopy(getattr(mtq, WEIGHT_RECIPES[precision.weights]))
    else:
        config = {"quant_cfg": [{"quantizer_name": "*", "enable": False}], "algorithm": "max"}
    if precision.lm_head:
        config["quant_cfg"] += copy.deepcopy(LM_HEAD_RECIPES[precision.lm_head])
    if precision.kv_cache:
        config["quant_cfg"] += copy.deepcopy(mtq.FP8_KV_CFG["quant_cfg"])
    config["quant_cfg"] += [{"quantizer_name": pattern, "enable": False} for pattern in exclude]
    return config


def calibration_batch_size(precision: Precision) -> int:
    return CALIBRATION_BATCH.get(precision.weights, 1)
