"""Numerical parity of an exported LLM against the transformers model it came from.

Pass criterion (per scenario): max |logit error| <= ``rel_tol`` x max |logit|,
cosine similarity of every logit row >= ``min_cosine``, and, where required,
identical greedy tokens. The reference of a quantized export is ModelOpt's
fake-quantized model (for GPTQ, the float model holding the dequantized weights);
:func:`tolerance_for` gives the criterion per precision.

The graph computes in float16, the reference in float32. With quantized activations a value
near a rounding boundary lands on either side depending on that arithmetic alone, and how much
that moves the logits depends on the model, not on the export: the same correct fp8 export is
3.8% off on one tiny model and over 10% on another. So each run also measures the reference's
own noise floor, the reference in float16 against itself in float32 on the same inputs, and
:func:`judge` sets the bound at :data:`FLOOR_MARGIN` times that floor, never tighter than the
format's base bound and never looser than its ceiling.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from edgellm_steps.artifacts.sources import read_hf_config
from edgellm_steps.models.families import family_for
from edgellm_steps.quant.formats import FLOAT_WEIGHTS, FORMATS, Tolerance

#: How far past the reference's own noise floor a correct export may land. The export and the float16
#: reference differ from the float32 one by the same mechanism (roundings that flip at boundaries), with
#: different arithmetic order; measured on the test models, the export's error over the floor is 0.6-1.9x.
FLOOR_MARGIN = 2.0

#: Per format, from the format table (where each bound is measured and justified); a graph takes its loosest.
TOLERANCES: dict[str, Tolerance] = {name: row.tolerance for name, row in FORMATS.items()}


def tolerance_for(formats: tuple[str, ...]) -> Tolerance:
    """The criterion of the loosest format a graph carries (the weights' row when none is looser)."""
    chosen = TOLERANCES[formats[0]] if formats else TOLERANCES[FLOAT_WEIGHTS]
    for fmt in formats[1:]:
        candidate = TOLERANCES[fmt]
        if candidate.rel_tol > chosen.rel_tol or (not candidate.greedy and chosen.greedy):
            chosen = candidate
    return chosen


@dataclass(frozen=True)
class ParityResult:
    max_abs_error: float
    max_abs_logit: float
    min_cosine: float
    greedy_match: bool
    greedy_agreement: float

    @property
    def relative_error(self) -> float:
        return self.max_abs_error / max(self.max_abs_logit, 1e-12)

    def passed(self, tolerance: Tolerance = TOLERANCES[FLOAT_WEIGHTS]) -> bool:
        greedy_ok = self.greedy_match or not tolerance.greedy
        return self.relative_error <= tolerance.rel_tol and self.min_cosine >= tolerance.min_cosine and greedy_ok

    def __str__(self) -> str:
        return (
            f"max|err| {self.max_abs_error:.3g} ({self.relative_error:.2%} of max|logit| {self.max_abs_logit:.3g}), "
            f"min cosine {self.min_cosine:.6f}, greedy agreement {self.greedy_agreement:.0%}"
        )


def compare_logits(candidate: np.ndarray, reference: np.ndarray) -> ParityResult:
    """Compare logit rows ``[..., V]`` of an export against the reference model's."""
    cand = candidate.reshape(-1, candidate.shape[-1]).astype(np.float64)
    ref = reference.reshape(-1, reference.shape[-1]).astype(np.float64)
    if cand.shape != ref.shape:
        raise ValueError(f"logit shapes differ: {candidate.shape} vs {reference.shape}")
    norms = np.linalg.norm(cand, axis=-1) * np.linalg.norm(ref, axis=-1)
    cosine = (cand * ref).sum(-1) / np.maximum(norms, 1e-30)
    return ParityResult(
        max_abs_error=float(np.abs(cand - ref).max()),
        max_abs_logit=float(np.abs(ref).max()),
        min_cosine=float(cosine.min()),
        greedy_match=bool((cand.argmax(-1) == ref.argmax(-1)).all()),
        greedy_agreement=float((cand.argmax(-1) == ref.argmax(-1)).mean()),
    )


def judge(tolerance: Tolerance, floor: ParityResult) -> Tolerance:
    """The bound of one case: ``FLOOR_MARGIN`` x the reference's noise floor, between base and ceiling.

    A greedy token the float16 reference itself flips is a tie, so greedy equality is required only
    where the floor kept every greedy token.
    """
    rel = min(tolerance.rel_tol, max(tolerance.base_rel_tol, FLOOR_MARGIN * floor.relative_error))
    gap = min(1 - tolerance.min_cosine, max(1 - tolerance.base_min_cosine, FLOOR_MARGIN * (1 - floor.min_cosine)))
    return replace(tolerance, rel_tol=rel, min_cosine=1 - gap, greedy=tolerance.greedy and floor.greedy_match)


def hf_rope_table(model, length: int) -> np.ndarray:
    """The runtime's ``rope_rotary_cos_sin`` [1, length, rot], taken from the HF model's own rotary module.

    Using transformers' module (not our config reading) keeps the reference independent
    of the exporter: scaled RoPE variants (llama3, yarn) come out exactly as HF computes them.
    For a VLM the rotary module is its language model's; with text-only positions MRoPE's
    three components are equal, so row p is the ordinary RoPE of position p, which is what
    the runtime fills for a text-only sequence.
    """
    base = model.model
    return rope_table(getattr(base, "rotary_emb", None) or base.language_model.rotary_emb, length)


def rope_table(rotary, length: int) -> np.ndarray:
    """``rope_rotary_cos_sin`` [1, length, rot] from a transformers rotary embedding module."""
    import torch

    positions = torch.arange(length)[None]
    with torch.no_grad():
        cos, sin = rotary(torch.zeros(1, dtype=torch.float32), positions)
    half = cos.shape[-1] // 2
    return torch.cat([cos[..., :half], sin[..., :half]], dim=-1).float().numpy()


def config_rope_table(checkpoint: Path, length: int) -> np.ndarray:
    """The runtime's ``rope_rotary_cos_sin`` [1, length, rot] for ``checkpoint``, from transformers' own rotary
    module built from its config alone (the model is laid out on the meta device: no weight is read)."""
    import torch
    import transformers

    config = transformers.AutoConfig.from_pretrained(str(checkpoint))
    auto_class = getattr(transformers, family_for(read_hf_config(checkpoint), where=str(checkpoint)).hf_auto_class)
    with torch.device("meta"):
        skeleton = auto_class.from_config(config)
    base = skeleton.model
    rotary = getattr(base, "rotary_emb", None) or base.language_model.rotary_emb
    return rope_table(type(rotary)(config=rotary.config), length)
