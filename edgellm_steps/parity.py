"""Numerical parity of an exported LLM against the transformers model it came from.

Pass criterion (per compared step): max |logit error| <= ``rel_tol`` x max |logit|,
cosine similarity of every logit row >= ``min_cosine``, and identical greedy tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

REL_TOL = 3e-2
MIN_COSINE = 0.999


@dataclass(frozen=True)
class ParityResult:
    max_abs_error: float
    max_abs_logit: float
    min_cosine: float
    greedy_match: bool

    @property
    def relative_error(self) -> float:
        return self.max_abs_error / max(self.max_abs_logit, 1e-12)

    def passed(self, rel_tol: float = REL_TOL, min_cosine: float = MIN_COSINE) -> bool:
        return self.relative_error <= rel_tol and self.min_cosine >= min_cosine and self.greedy_match

    def __str__(self) -> str:
        return (
            f"max|err| {self.max_abs_error:.3g} ({self.relative_error:.2%} of max|logit| {self.max_abs_logit:.3g}), "
            f"min cosine {self.min_cosine:.6f}, greedy {'equal' if self.greedy_match else 'DIFFERENT'}"
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
    )


def hf_rope_table(model, length: int) -> np.ndarray:
    """The runtime's ``rope_rotary_cos_sin`` [1, length, rot], taken from the HF model's own rotary module.

    Using transformers' module (not our config reading) keeps the reference independent
    of the exporter: scaled RoPE variants (llama3, yarn) come out exactly as HF computes them.
    """
    import torch

    rotary = model.model.rotary_emb
    positions = torch.arange(length)[None]
    with torch.no_grad():
        cos, sin = rotary(torch.zeros(1, dtype=torch.float32), positions)
    half = cos.shape[-1] // 2
    return torch.cat([cos[..., :half], sin[..., :half]], dim=-1).float().numpy()
