"""Model shapes a precision cannot pack, found from ``config.json`` alone (at planning and before calibration).

Block formats quantize GEMM inputs in blocks along the input dimension, and the int4
plugin packs output rows in groups; a model whose dims are not multiples fails here, in
one line naming the layer, instead of after an hour of calibration.
"""

from __future__ import annotations

from typing import Any

from edgellm_steps.artifacts.checkpoint import decoder_dims
from edgellm_steps.errors import PrecisionError
from edgellm_steps.quant.precision import INT4_ROW_GROUP, Precision
from edgellm_steps.quant.recipes import BLOCK_SIZES, INT4_FORMATS


def check_block_dims(hf_config: dict[str, Any], precision: Precision, *, where: str) -> None:
    """Block formats quantize GEMM inputs in blocks (int4: 128, nvfp4: 16): input dims must be multiples."""
    dims = decoder_dims(hf_config)
    layers = (
        ("self_attn.q_proj/k_proj/v_proj/mlp.gate_proj/up_proj (hidden_size)", dims.hidden_size),
        ("self_attn.o_proj (num_attention_heads x head_dim)", dims.num_heads * dims.head_dim),
        ("mlp.down_proj (intermediate_size)", dims.intermediate_size),
    )
    fix = "use fp8 or int8_sq weights for this model"
    checks = [(precision.weights, f"model.layers.*.{layer}", size, fix) for layer, size in layers]
    checks.append((precision.lm_head, "lm_head (hidden_size)", dims.hidden_size, "use -lmfp8 for this model"))
    for fmt, layer, size, fix in checks:
        block = BLOCK_SIZES.get(fmt or "")
        if block and size % block:
            raise PrecisionError(
                f"{where}: {fmt} needs GEMM input dims that are multiples of {block}, but {layer} has {size}; {fix}"
            )
    if precision.weights in INT4_FORMATS:
        outputs = (
            ("self_attn.q_proj (num_attention_heads x head_dim)", dims.num_heads * dims.head_dim),
            ("self_attn.k_proj/v_proj (num_key_value_heads x head_dim)", dims.num_kv_heads * dims.head_dim),
            ("mlp.gate_proj/up_proj (intermediate_size)", dims.intermediate_size),
            ("self_attn.o_proj/mlp.down_proj (hidden_size)", dims.hidden_size),
        )
        for layer, size in outputs:
            if size % INT4_ROW_GROUP:
                raise PrecisionError(
                    f"{where}: {precision.weights} packs output rows in groups of {INT4_ROW_GROUP}, but "
                    f"model.layers.*.{layer} has {size} rows; {fix}"
                )
