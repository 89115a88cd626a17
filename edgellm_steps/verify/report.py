"""The end of every verify run: the verdict into the report, the report onto disk, a miss into one error."""

from __future__ import annotations

import json
from typing import Any

from edgellm_steps.artifacts.atomic import write_claimed
from edgellm_steps.errors import ParityError
from edgellm_steps.verify.parity import ParityResult, Tolerance


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
