"""The precision grammar: ``<weights>[-lm<lm_head>][-kv<kv_cache>]``, and the facts of each format.

Examples: ``fp16``, ``fp8``, ``int4_awq-lmfp8``, ``nvfp4-kvfp8``,
``int8_sq-lmnvfp4-kvfp8``. Which format each part admits and which SM runs it
come from the format table (``quant/formats.py``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from edgellm_steps.errors import PrecisionError
from edgellm_steps.quant.formats import FORMATS, formats_for

WEIGHT_PRECISIONS = formats_for("weights")
LM_HEAD_PRECISIONS = formats_for("lm_head")
KV_CACHE_PRECISIONS = formats_for("kv_cache")

#: Lowest SM that can run a quantized format (contract section 1).
SM_FLOOR = {name: row.sm_floor for name, row in FORMATS.items() if row.sm_floor}

KNOWN_SM_TARGETS = (80, 86, 87, 89, 90, 100, 110, 120, 121)

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
        """Weights made by quantize-llm, or any override; float weights export as is, held formats are quantized."""
        return FORMATS[self.weights].made == "quantize" or bool(self.lm_head or self.kv_cache)

    @property
    def from_statistics(self) -> bool:
        """Calibrated from the model's shared statistics pass (its weights' format says; the LM-head and KV-cache
        overrides are max calibration, which the statistics serve)."""
        return FORMATS[self.weights].from_statistics

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
