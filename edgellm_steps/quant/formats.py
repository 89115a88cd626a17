"""Every numeric format of weights, lm_head and KV cache, one frozen row each: the one place a format is described.

A row says where the precision grammar admits the format, which SM can run it, its GEMM block size,
the ModelOpt recipe that makes it, how a pre-quantized checkpoint spells it, the calibration batch and
the memory a quantize job needs, the verify tolerance, the ONNX emitter and KV dtype of its graphs, and
whether this project makes it or only reads it from a checkpoint that holds it. Everything else (the
grammar, SM checks, recipes, held-precision detection, memory requests, parity bounds) reads the table;
a new format is one new row. Every column is required: a row that leaves one out fails at import.

This module is read at planning time: it imports nothing heavy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from edgellm_steps.graph.opsets import FP4_OPSET, OPSET

#: Largest finite float8 e4m3fn value: the range of fp8 weights, activations and KV caches,
#: and of NVFP4's block scales.
FP8_E4M3_MAX = 448.0
#: Largest float4 e2m1 magnitude: the range of NVFP4 codes.
FP4_E2M1_MAX = 6.0
#: NVFP4 scales the last axis in blocks of this many values, one E4M3 scale per block.
NVFP4_BLOCK_SIZE = 16
#: Largest int8 code (int8_sq, symmetric): codes are round(x * 127 / amax), clamped to [-128, 127].
INT8_MAX = 127.0
#: Largest int4 code (int4_awq, int4_gptq, symmetric): codes lie in [-8, 7].
INT4_MAX = 7.0
#: int4 codes are stored unsigned as code + 8 (``trt::Int4GroupwiseGemmPlugin``, GPTQ's qzeros).
INT4_ZERO_POINT = 8
#: int4 weights carry one scale per group of this many consecutive inputs.
INT4_GROUP_SIZE = 128
#: The int4 plugin packs output rows in groups of this many, one group per 16-bit word (contract 3.5).
INT4_ROW_GROUP = 4

Role = Literal["weights", "lm_head", "kv_cache"]

REL_TOL = 3e-2
MIN_COSINE = 0.999


@dataclass(frozen=True)
class Tolerance:
    """verify's pass criterion: max |logit error| <= rel_tol x max |logit|, row cosines >= min_cosine.

    As a format's row, ``rel_tol`` / ``min_cosine`` are the ceiling: no measured noise floor loosens the
    bound past them. ``base_rel_tol`` / ``base_min_cosine`` are the bound while the reference's own noise
    floor is small (verify's ``judge`` takes the floor times its margin when that is looser).
    """

    rel_tol: float = REL_TOL
    min_cosine: float = MIN_COSINE
    greedy: bool = True
    why: str = "same weights; only float16 arithmetic differs from the float32 reference"
    base_rel_tol: float = REL_TOL
    base_min_cosine: float = MIN_COSINE


@dataclass(frozen=True)
class PeakModel:
    """Peak RSS = ``factor`` x checkpoint weight bytes + ``logit_bytes`` x batch x tokens x vocab_size."""

    factor: float
    logit_bytes: float = 0.0


#: ModelOpt spells a float format as (exponent bits, mantissa bits).
_E4M3, _E2M1 = (4, 3), (2, 1)

#: Peak of a quantize-llm job that calibrates (weights fp8, int8_sq, nvfp4, or fp16 with overrides);
#: measured by bench/quantize_bench.py, cited in workflow/resources.py.
_CALIBRATION_PEAK = PeakModel(factor=3.3, logit_bytes=4)

# Tolerances per format; a graph takes its loosest format's. Weight-only int4 holds exact codes (ModelOpt's,
# or GPTQ's dequantized into the reference), so it keeps the fp16 criterion. With quantized activations a
# value at a rounding boundary lands on either side when the graph computes in float16 and the reference in
# float32: one int8 step is 1/127 of the range, one e4m3 step 6-12% of the value, one E2M1 step 25-33%. How
# far that moves the logits depends on the model: the fake-quantized reference in float16 against itself in
# float32 measured 1.7-2.1% (int8_sq), 3.5-5.4% (fp8) and 7.9-22.9% (nvfp4) of max |logit| on the tiny test
# models, and 11-14% (fp8) on a Llama-3-shaped one, where a correct fp8 export lands at 10.4%. So verify
# measures that floor on every run and bounds the export at parity.FLOOR_MARGIN x the floor (the export's
# error over its floor: 0.6-1.9x measured), never tighter than the base bounds fitted on the test models
# (the last two figures of each row); the first two are the ceiling no floor can loosen past, set
# under what the negative controls reach (weight scales off by 2x: 47-65% and cosine <= 0.89; a layer's
# weights from another: >= 100%, cosine <= 0.4; calibration at its defaults: 45-122%, cosine <= 0.91).
# Layer tests hold the weights (exact codes) and GEMMs (0.5% of max |y|) to tight bounds.


@dataclass(frozen=True, kw_only=True)
class Format:
    """One numeric format; every column must be given."""

    name: str
    #: Where the precision grammar admits it: ``<weights>[-lm<lm_head>][-kv<kv_cache>]``.
    roles: frozenset[Role]
    #: Lowest SM that runs it (contract section 1); 0: every known target.
    sm_floor: int
    #: GEMM input dims must be multiples of this (quantization blocks or groups); None: any width.
    block_size: int | None
    #: "as is": exported from float weights without a quantize job; "quantize": made by quantize-llm
    #: (ModelOpt); "held": only read from a checkpoint already quantized so (never made here).
    made: Literal["as is", "quantize", "held"]
    #: The ModelOpt weight recipe (an attribute of ``modelopt.torch.quantization``) when it is the weights.
    modelopt_recipe: str | None
    #: ModelOpt's quantizer config for the lm_head when it is the lm_head (weight and input quantizers).
    lm_head_quantizer: dict[str, Any] | None
    #: How ``hf_quant_config.json`` spells it (``quant_algo``, ``kv_cache_quant_algo``,
    #: ``quantized_layers.lm_head.quant_algo``); None: never in that file.
    hf_quant_algo: str | None
    #: ``config.json``'s ``quantization_config.quant_method`` of a checkpoint holding it, and how a
    #: message names that method (``held`` formats only).
    quant_method: str | None
    quant_method_label: str | None
    #: The format to ask for instead when a float checkpoint is requested in a ``held`` format.
    quantize_instead: str | None
    #: Calibration samples per forward pass by default (the classic tool's); None: never calibrated.
    calibration_batch: int | None
    #: Its calibration reads nothing of the activations but their maxima (max calibration, SmoothQuant), so the
    #: model's shared statistics pass (calibrate-llm) serves it; False: it needs the activations (AWQ's search).
    from_statistics: bool
    #: Host memory of a quantize-llm job with these weights; None: no quantize job.
    quantize_peak: PeakModel | None
    #: verify-onnx holds the float model: bytes of it per byte of checkpoint weights in this format.
    verify_expansion: int
    #: verify-onnx's criterion for a graph carrying this format.
    tolerance: Tolerance
    #: The Linear emitter in ``export/quantized_linear.py`` (its ``EMITTERS`` key); None: a float16 MatMul.
    onnx_emitter: str | None
    #: Weights stored through ``trt::Int4GroupwiseGemmPlugin`` (packed int4 codes, contract 3.5).
    int4_plugin: bool
    #: The opset a graph carrying it needs.
    onnx_opset: int
    #: The ``onnx.TensorProto`` element type of a KV cache in this format; None: not a KV format.
    kv_onnx_dtype: str | None

    @property
    def made_here(self) -> bool:
        return self.made != "held"


_ROWS = (
    Format(
        name="fp16",
        roles=frozenset({"weights"}),
        sm_floor=0,
        block_size=None,
        made="as is",
        modelopt_recipe=None,
        lm_head_quantizer=None,
        hf_quant_algo=None,
        quant_method=None,
        quant_method_label=None,
        quantize_instead=None,
        calibration_batch=1,
        from_statistics=True,
        # fp16 weights with LM-head or KV overrides calibrate like fp8 (measured: fp16-lmfp8-kvfp8 3.3 GiB).
        quantize_peak=_CALIBRATION_PEAK,
        verify_expansion=1,
        tolerance=Tolerance(),
        onnx_emitter=None,
        int4_plugin=False,
        onnx_opset=OPSET,
        kv_onnx_dtype=None,
    ),
    Format(
        name="fp8",
        roles=frozenset({"weights", "lm_head", "kv_cache"}),
        sm_floor=89,
        block_size=None,
        made="quantize",
        modelopt_recipe="FP8_DEFAULT_CFG",
        lm_head_quantizer={"num_bits": _E4M3, "axis": None},
        hf_quant_algo="FP8",
        quant_method=None,
        quant_method_label=None,
        quantize_instead=None,
        calibration_batch=1,
        from_statistics=True,
        quantize_peak=_CALIBRATION_PEAK,
        verify_expansion=1,
        tolerance=Tolerance(0.25, 0.98, False, "fp8 activation and KV quantization noise (floor 3.5-14%)", 8e-2, 0.995),
        onnx_emitter="fp8",
        int4_plugin=False,
        onnx_opset=OPSET,
        kv_onnx_dtype="FLOAT8E4M3FN",
    ),
    Format(
        name="int8_sq",
        roles=frozenset({"weights"}),
        sm_floor=0,
        block_size=None,
        made="quantize",
        modelopt_recipe="INT8_SMOOTHQUANT_CFG",
        lm_head_quantizer=None,
        hf_quant_algo="W8A8_SQ_PER_CHANNEL",
        quant_method=None,
        quant_method_label=None,
        quantize_instead=None,
        calibration_batch=1,
        from_statistics=True,
        quantize_peak=_CALIBRATION_PEAK,
        verify_expansion=1,
        tolerance=Tolerance(0.15, 0.99, False, "int8 activation quantization noise (floor 1.7-2.1%)"),
        onnx_emitter="int8_sq",
        int4_plugin=False,
        onnx_opset=OPSET,
        kv_onnx_dtype=None,
    ),
    Format(
        name="int4_awq",
        roles=frozenset({"weights"}),
        sm_floor=0,
        block_size=INT4_GROUP_SIZE,
        made="quantize",
        modelopt_recipe="INT4_AWQ_CFG",
        lm_head_quantizer=None,
        hf_quant_algo="W4A16_AWQ",
        quant_method=None,
        quant_method_label=None,
        quantize_instead=None,
        calibration_batch=16,
        from_statistics=False,
        # AWQ's search holds more: measured 5.7 GiB at batch 1, 10.2 GiB at batch 16 on the 0.5B model.
        quantize_peak=PeakModel(factor=5.9, logit_bytes=4.5),
        verify_expansion=1,
        tolerance=Tolerance(),
        onnx_emitter="int4_awq",
        int4_plugin=True,
        onnx_opset=OPSET,
        kv_onnx_dtype=None,
    ),
    Format(
        name="int4_gptq",
        roles=frozenset({"weights"}),
        sm_floor=0,
        block_size=INT4_GROUP_SIZE,
        made="held",
        modelopt_recipe=None,
        lm_head_quantizer=None,
        hf_quant_algo=None,
        quant_method="gptq",
        quant_method_label="GPTQ",
        quantize_instead="int4_awq",
        calibration_batch=None,
        from_statistics=False,
        quantize_peak=None,
        # verify runs the float model holding the dequantized weights: int4 -> 16 bits (an upper bound,
        # since a GPTQ checkpoint's embeddings and norms are 16-bit already). Derived, not measured.
        verify_expansion=4,
        tolerance=Tolerance(why="the reference holds GPTQ's dequantized codes, the graph's very weights"),
        onnx_emitter="gptq",
        int4_plugin=True,
        onnx_opset=OPSET,
        kv_onnx_dtype=None,
    ),
    Format(
        name="nvfp4",
        roles=frozenset({"weights", "lm_head"}),
        sm_floor=100,
        block_size=NVFP4_BLOCK_SIZE,
        made="quantize",
        modelopt_recipe="NVFP4_DEFAULT_CFG",
        lm_head_quantizer={
            "num_bits": _E2M1,
            "block_sizes": {-1: NVFP4_BLOCK_SIZE, "type": "dynamic", "scale_bits": _E4M3},
        },
        hf_quant_algo="NVFP4",
        quant_method=None,
        quant_method_label=None,
        quantize_instead=None,
        calibration_batch=1,
        from_statistics=True,
        quantize_peak=_CALIBRATION_PEAK,
        verify_expansion=1,
        tolerance=Tolerance(0.45, 0.88, False, "nvfp4 activation quantization noise (floor 8-26%)", 0.30, 0.96),
        onnx_emitter="nvfp4",
        int4_plugin=False,
        onnx_opset=FP4_OPSET,
        kv_onnx_dtype=None,
    ),
)

#: The weight format of a float checkpoint exported as is.
FLOAT_WEIGHTS = "fp16"

#: The table, by format name, in the order the grammar lists them.
FORMATS: dict[str, Format] = {row.name: row for row in _ROWS}

#: The calibration batch of the shared statistics pass: that of every format it serves (the pass is one
#: forward for all of them, so they must agree; padding in a larger batch would change the maxima).
(STATISTICS_BATCH,) = {row.calibration_batch for row in _ROWS if row.from_statistics}


def formats_for(role: Role) -> tuple[str, ...]:
    """The format names the grammar admits in ``role``, in table order."""
    return tuple(name for name, row in FORMATS.items() if role in row.roles)


def held_format(quant_method: str) -> Format | None:
    """The format a checkpoint whose ``quantization_config.quant_method`` is ``quant_method`` holds."""
    return next((row for row in _ROWS if row.quant_method == quant_method), None)
