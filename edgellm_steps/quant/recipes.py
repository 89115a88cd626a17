"""ModelOpt recipes per precision (contract section 2), composed from the format table.

A precision string maps to one ModelOpt ``quant_cfg`` list: the weight recipe
(the format table's ``modelopt_recipe``), then the LM-head override (its
``lm_head_quantizer``), then ``FP8_KV_CFG``. Later entries win in ModelOpt, so
the order is the precedence.
"""

from __future__ import annotations

import copy
from typing import Any

from edgellm_steps.quant.formats import FORMATS
from edgellm_steps.quant.precision import Precision

WEIGHT_RECIPES = {name: row.modelopt_recipe for name, row in FORMATS.items() if row.modelopt_recipe}
LM_HEAD_RECIPES: dict[str, list[dict[str, Any]]] = {
    name: [
        {"quantizer_name": "*lm_head*weight_quantizer", "cfg": row.lm_head_quantizer},
        {"quantizer_name": "*lm_head*input_quantizer", "cfg": row.lm_head_quantizer},
    ]
    for name, row in FORMATS.items()
    if row.lm_head_quantizer is not None
}


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
    """Calibration samples per forward pass by default (the classic tool's), by the weight format."""
    return FORMATS[precision.weights].calibration_batch or 1
