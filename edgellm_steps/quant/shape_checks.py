"""Model shapes a precision cannot pack, found from ``config.json`` alone (at planning and before calibration).

Block formats quantize GEMM inputs in blocks along the input dimension, and the int4
plugin packs output rows in groups; a model whose dims are not multiples fails here, in
one line naming the layer, instead of after an hour of calibration. Decoders and EAGLE3
drafts differ only in their GEMMs' widths, listed per kind below.
"""

from __future__ import annotations

from typing import Any

from edgellm_steps.artifacts.checkpoint import decoder_dims, draft_widths
from edgellm_steps.errors import PrecisionError
from edgellm_steps.quant.formats import FORMATS, INT4_ROW_GROUP
from edgellm_steps.quant.precision import Precision

#: (layers, width) pairs: a GEMM's input widths, or its output widths.
Widths = tuple[tuple[str, int], ...]

#: Formats that quantize GEMM inputs in blocks, and the block size: input dims must be multiples of it.
BLOCK_SIZES = {name: row.block_size for name, row in FORMATS.items() if row.block_size}
#: Weight formats stored through ``trt::Int4GroupwiseGemmPlugin``.
INT4_FORMATS = tuple(name for name, row in FORMATS.items() if row.int4_plugin)


def _check(precision: Precision, inputs: Widths, outputs: Widths, lm_head: int, where: str, what: str) -> None:
    fix = f"use fp8 or int8_sq weights for this {what}"
    checks = [(precision.weights, layer, size, fix) for layer, size in inputs]
    checks.append((precision.lm_head, "lm_head (hidden_size)", lm_head, f"use -lmfp8 for this {what}"))
    for fmt, layer, size, fix in checks:
        block = BLOCK_SIZES.get(fmt or "")
        if block and size % block:
            raise PrecisionError(
                f"{where}: {fmt} needs GEMM input dims that are multiples of {block}, but {layer} has {size}; {fix}"
            )
    if precision.weights in INT4_FORMATS:
        for layer, size in outputs:
            if size % INT4_ROW_GROUP:
                raise PrecisionError(
                    f"{where}: {precision.weights} packs output rows in groups of {INT4_ROW_GROUP}, but "
                    f"{layer} has {size} rows; {fix}"
                )


def check_block_dims(hf_config: dict[str, Any], precision: Precision, *, where: str) -> None:
    """Block formats quantize GEMM inputs in blocks (int4: 128, nvfp4: 16): input dims must be multiples."""
    dims = decoder_dims(hf_config)
    q_width, kv_width = dims.num_heads * dims.head_dim, dims.num_kv_heads * dims.head_dim
    inputs = (
        ("model.layers.*.self_attn.q_proj/k_proj/v_proj/mlp.gate_proj/up_proj (hidden_size)", dims.hidden_size),
        ("model.layers.*.self_attn.o_proj (num_attention_heads x head_dim)", q_width),
        ("model.layers.*.mlp.down_proj (intermediate_size)", dims.intermediate_size),
    )
    outputs = (
        ("model.layers.*.self_attn.q_proj (num_attention_heads x head_dim)", q_width),
        ("model.layers.*.self_attn.k_proj/v_proj (num_key_value_heads x head_dim)", kv_width),
        ("model.layers.*.mlp.gate_proj/up_proj (intermediate_size)", dims.intermediate_size),
        ("model.layers.*.self_attn.o_proj/mlp.down_proj (hidden_size)", dims.hidden_size),
    )
    _check(precision, inputs, outputs, dims.hidden_size, where, "model")


def check_draft_block_dims(draft_config: dict[str, Any], precision: Precision, *, where: str) -> None:
    """As :func:`check_block_dims` for an EAGLE3 draft: ``fc`` reads 3 x target_hidden_size, q/k/v read 2H."""
    dims = decoder_dims(draft_config)
    target, _ = draft_widths(draft_config)
    q_width, kv_width = dims.num_heads * dims.head_dim, dims.num_kv_heads * dims.head_dim
    inputs = (
        ("fc (3 x target_hidden_size)", 3 * target),
        ("midlayer.self_attn.q_proj/k_proj/v_proj (2 x hidden_size)", 2 * dims.hidden_size),
        ("midlayer.self_attn.o_proj (num_attention_heads x head_dim)", q_width),
        ("midlayer.mlp.gate_proj/up_proj (hidden_size)", dims.hidden_size),
        ("midlayer.mlp.down_proj (intermediate_size)", dims.intermediate_size),
    )
    outputs = (
        ("fc/midlayer.self_attn.o_proj/midlayer.mlp.down_proj (hidden_size)", dims.hidden_size),
        ("midlayer.self_attn.q_proj (num_attention_heads x head_dim)", q_width),
        ("midlayer.self_attn.k_proj/v_proj (num_key_value_heads x head_dim)", kv_width),
        ("midlayer.mlp.gate_proj/up_proj (intermediate_size)", dims.intermediate_size),
    )
    _check(precision, inputs, outputs, dims.hidden_size, where, "draft")
