"""Every verify run's report, in one schema for LLM, draft and vision exports, and how a run ends.

A report names the export and the checkpoint, the kind (``llm``, ``eagle3_base``, ``eagle3_draft``,
``visual``), the precision, the criterion (``tolerances``), what was fed (``inputs``) and per case
the figures of :class:`~edgellm_steps.verify.parity.ParityResult` (``max_abs_reference`` is the
largest reference value: a logit, or a vision embedding), then ``passed``.
"""

from __future__ import annotations

import json
from typing import Any

from edgellm_steps.artifacts.atomic import write_claimed
from edgellm_steps.errors import ParityError
from edgellm_steps.verify.parity import ParityResult, Tolerance


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
) -> dict[str, Any]:
    """The report of a verify run (without its verdict, which :func:`conclude` adds)."""
    case_inputs = case_inputs or {}
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
                "passed": r.passed(tolerance),
            }
            for name, r in results.items()
        },
    }


def conclude(
    summary: dict[str, Any], results: dict[str, ParityResult], tolerance: Tolerance, claim: Any, mismatch: str
) -> dict[str, Any]:
    """Add ``passed`` to ``summary``, write it through ``claim`` (if any), raise :class:`ParityError` on a miss.

    The report is written before the error is raised: a failing run still leaves its figures.
    ``mismatch`` opens the error line, e.g. "<export> does not match <checkpoint>".
    """
    summary["passed"] = all(r.passed(tolerance) for r in results.values())
    if claim is not None:
        write_claimed(claim, (json.dumps(summary, indent=2) + "\n").encode())
    if not summary["passed"]:
        failed = [f"{name} ({r})" for name, r in results.items() if not r.passed(tolerance)]
        raise ParityError(f"{mismatch}: {'; '.join(failed)}")
    return summary
