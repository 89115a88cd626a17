"""The precision grammar: ``<weights>[-lm<lm_head>][-kv<kv_cache>]``, and the facts of each format.

Examples: ``fp16``, ``fp8``, ``int4_awq-lmfp8``, ``nvfp4-kvfp8``,
``int8_sq-lmnvfp4-kvfp8``. Facts about each precision (which SM can run it,
whether it needs a quantize job) and the numbers of each numeric format (code
ranges, block and group sizes) are defined here once; the quantizers, the graph
and the CPU references import them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from edgellm_steps.errors import PrecisionError

WEIGHT_PRECISIONS = ("fp16", "fp8", "int8_sq", "int4_awq", "int4_gptq", "nvfp4")
LM_HEAD_PRECISIONS = ("fp8", "nvfp4")
KV_CACHE_PRECISIONS = ("fp8",)

#: Lowest SM that can run a quantized format (contract section 1).
SM_FLOOR = {"fp8": 89, "nvfp4": 100}

KNOWN_SM_TARGETS = (80, 86, 87, 89, 90, 100, 110, 120, 121)

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

GRAMMAR = "<weights>[-lm<lm_head>][-kv<kv_cache>] with weights in {}, lm_head in {}, kv_cache in {}".format(
    "|".join(WEIGHT_PRECISIONS), "|".join(LM_HEAD_PRECISIONS), "|".join(KV_CACHE_PRECISIONS)
)

_PATTERN = re.compile(r"^(?P<weights>[a-z0-9_]+)(?:-lm(?P<lm_head>[a-z0-9_]+))?(?:-kv(?P<kv>[a-z0-9_]+))?$")


@dataclass(frozen=True)
class Precision:
    """A parsed precision string."""

    weights: str
    lm_head: str | None = None
    kv_cache: str | None = None

    def __str__(self) -> str:
        text = self.weights
        if self.lm_head:
            text += f"-lm{self.lm_head}"
        if self.kv_cache:
            text += f"-kv{self.kv_cache}"
        return text

    @property
    def needs_quantize_step(self) -> bool:
        """fp16 exports the checkpoint as is; int4_gptq is quantized already."""
        return self.weights not in ("fp16", "int4_gptq") or bool(self.lm_head or self.kv_cache)

    def formats(self) -> tuple[str, ...]:
        """Every numeric format the graph carries, for SM floor checks and parity tolerances."""
        return tuple(f for f in (self.weights, self.lm_head, self.kv_cache) if f)


def parse_precision(text: str) -> Precision:
    """Parse ``text`` or raise :class:`PrecisionError` quoting the grammar."""
    match = _PATTERN.match(text)
    if match is None:
        raise PrecisionError(f"malformed precision '{text}': expected {GRAMMAR}")
    weights, lm_head, kv = match.group("weights"), match.group("lm_head"), match.group("kv")
    for value, allowed, what in (
        (weights, WEIGHT_PRECISIONS, "weight"),
        (lm_head, LM_HEAD_PRECISIONS, "lm_head"),
        (kv, KV_CACHE_PRECISIONS, "kv_cache"),
    ):
        if value is not None and value not in allowed:
            raise PrecisionError(f"unknown {what} precision '{value}' in '{text}': expected {GRAMMAR}")
    return Precision(weights, lm_head, kv)


def check_sm_supports(precision: Precision, sm: int) -> None:
    """Raise when ``sm`` is not a known target or is below the :data:`SM_FLOOR` of a format of ``precision``."""
    if sm not in KNOWN_SM_TARGETS:
        known = ", ".join(str(s) for s in KNOWN_SM_TARGETS)
        raise PrecisionError(f"unknown SM target sm{sm}: known targets are {known}")
    for fmt in precision.formats():
        floor = SM_FLOOR.get(fmt, 0)
        if sm < floor:
            raise PrecisionError(
                f"precision '{precision}' uses {fmt}, which needs SM >= {floor}; "
                f"sm{sm} cannot run it: pick another precision or an SM target >= {floor}"
            )
