"""Every verify run's report, in one schema for LLM, draft and vision exports, and how a run ends.

A report names the export and the checkpoint, the kind (``llm``, ``eagle3_base``, ``eagle3_draft``,
``visual``), the precision, the criterion (``tolerances``), what was fed (``inputs``) and per case
the figures of :class:`~edgellm_steps.verify.parity.ParityResult` (``max_abs_reference`` is the
largest reference value: a logit, or a vision embedding), then ``passed``. Where the run measured
the reference's own noise floor, each case also states that floor and the bound judged from it.
"""

from __future__ import annotations

import json
from typing import Any

from edgellm_steps.artifacts.atomic import write_claimed
from edgellm_steps.errors import ParityError
from edgellm_steps.verify.parity import FLOOR_MARGIN, ParityResult, Tolerance, judge


def make_report(
    *,
    kind: str,
    onnx_dir: Any,
    model_dir: Any,
    precision: Any,
    tolerance: Tolerance,
    inputs: dict[str, Any],
    results: dict[str, ParityResult],
    adapter: Any = None,
    case_inputs: dict[str, Any] | None = None,
    floors: dict[str, ParityResult] | None = None,
) -> dict[str, Any]:
    """The report of a verify run (without its verdict, which :func:`conclude` adds).

    ``floors`` (per case) are the reference's own noise floor: the reference in the graph's precision
    against itself in float32. A case with a floor is judged by :func:`~edgellm_steps.verify.parity.judge`.
    """
    case_inputs, floors = case_inputs or {}, floors or {}
    bounds = {name: judge(tolerance, floors[name]) if name in floors else tolerance for name in results}
    return {
        "onnx_dir": str(onnx_dir),
        "model_dir": str(model_dir),
        "kind": kind,
        "precision": str(precision),
        "adapter": None if adapter is None else str(adapter),
        "tolerances": {
            "max_abs_error_over_max_abs_reference": tolerance.rel_tol,
            "min_cosine": tolerance.min_cosine,
            "greedy_must_match": tolerance.greedy,
            "why": tolerance.why,
            **(
                {
                    "judged_from_floor": "bound = margin x floor, at least the base bound, at most the ceiling above",
                    "floor_margin": FLOOR_MARGIN,
                    "base_max_abs_error_over_max_abs_reference": tolerance.base_rel_tol,
                    "base_min_cosine": tolerance.base_min_cosine,
                }
                if floors
                else {}
            ),
        },
        "inputs": inputs,
        "cases": {
            name: {
                **({"inputs": case_inputs[name]} if name in case_inputs else {}),
                "max_abs_error": r.max_abs_error,
                "max_abs_reference": r.max_abs_logit,
                "relative_error": r.relative_error,
                "min_cosine": r.min_cosine,
                "greedy_match": r.greedy_match,
                "greedy_agreement": r.greedy_agreement,
                **(_floor_figures(floors[name], bounds[name]) if name in floors else {}),
                "passed": r.passed(bounds[name]),
            }
            for name, r in results.items()
        },
    }


def _floor_figures(floor: ParityResult, bound: Tolerance) -> dict[str, Any]:
    """A case's noise floor, the bound judged from it, and how much room the export had."""
    return {
        "reference_floor": {
            "relative_error": floor.relative_error,
            "min_cosine": floor.min_cosine,
            "greedy_match": floor.greedy_match,
        },
        "bound": {"relative_error": bound.rel_tol, "min_cosine": bound.min_cosine, "greedy_must_match": bound.greedy},
    }


def conclude(
    summary: dict[str, Any],
    results: dict[str, ParityResult],
    tolerance: Tolerance | dict[str, Tolerance],
    claim: Any,
    mismatch: str,
) -> dict[str, Any]:
    """Add ``passed`` to ``summary``, write it through ``claim`` (if any), raise :class:`ParityError` on a miss.

    ``tolerance`` is one criterion for every case, or one per case (bounds judged from a noise floor).
    The report is written before the error is raised: a failing run still leaves its figures.
    ``mismatch`` opens the error line, e.g. "<export> does not match <checkpoint>".
    """
    bounds = tolerance if isinstance(tolerance, dict) else dict.fromkeys(results, tolerance)
    failed = [
        f"{name} ({r}; bound {bounds[name].rel_tol:.2%})" for name, r in results.items() if not r.passed(bounds[name])
    ]
    summary["passed"] = not failed
    if claim is not None:
        write_claimed(claim, (json.dumps(summary, indent=2) + "\n").encode())
    if failed:
        raise ParityError(f"{mismatch}: {'; '.join(failed)}")
    return summary
