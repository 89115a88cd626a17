"""What a model's accuracy report cost to make: each job's wall time and peak memory, from Snakemake's benchmarks.

Snakemake writes one tab-separated file per job with a ``benchmark:`` directive: a header row, then one row
per run (``repeat()`` gives several) with ``s`` (wall seconds), ``max_rss`` (MiB, the job's process tree),
``cpu_time`` and others. This step reads those of the jobs that made a model's exports (the shared
calibration, each quantize and export, the accuracy report itself) and writes a JSON table and an HTML page
for ``snakemake --report``. A job whose file is missing (run before benchmarks were kept, or deleted) is
listed as not measured rather than dropped, so the table never reads as complete when it is not.
"""

from __future__ import annotations

import csv
import html
import json
import logging
from pathlib import Path
from typing import Any

from edgellm_steps.artifacts.atomic import claim_file, write_claimed
from edgellm_steps.errors import EdgeLLMError
from edgellm_steps.verify.html_page import html_page

logger = logging.getLogger(__name__)

#: The columns read from a benchmark row, and what they are called here.
FIELDS = {"s": "wall_s", "max_rss": "max_rss_mib", "cpu_time": "cpu_s"}


def read_benchmark(path: Path) -> dict[str, float | None] | None:
    """The last run's wall seconds, peak RSS (MiB) and CPU seconds of one benchmark file; None if it is missing.

    A value Snakemake could not measure (``-`` or ``NA``, e.g. a job too short to sample) reads as None.
    """
    if not path.is_file():
        return None
    with path.open(newline="") as stream:
        rows = list(csv.DictReader(stream, delimiter="\t"))
    if not rows:
        raise EdgeLLMError(f"{path} has no benchmark row: not a Snakemake benchmark file")
    if missing := sorted(set(FIELDS) - set(rows[-1])):
        raise EdgeLLMError(f"{path} lacks the column {missing[0]!r}: not a Snakemake benchmark file")
    figures: dict[str, float | None] = {}
    for column, name in FIELDS.items():
        try:
            figures[name] = float(rows[-1][column])
        except ValueError:
            figures[name] = None
    return figures


def job_costs(benchmarks: dict[str, Path], *, report: Path, page: Path | None = None, model: str = "model") -> dict:
    """Write the table of ``benchmarks`` (job name -> benchmark file, in the chain's order) as JSON and HTML;
    each file whole or not at all, the JSON last."""
    claims = {path: claim_file(Path(path)) for path in (page, report) if path is not None}
    jobs = []
    for job, path in benchmarks.items():
        figures = read_benchmark(Path(path))
        jobs.append({"job": job, "benchmark": str(path), "measured": figures is not None, **(figures or {})})
    measured = [j for j in jobs if j["measured"]]
    summary: dict[str, Any] = {
        "model": model,
        "jobs": jobs,
        "total_wall_s": sum(j["wall_s"] or 0 for j in measured),
        "max_rss_mib": max((j["max_rss_mib"] or 0 for j in measured), default=0),
        "not_measured": [j["job"] for j in jobs if not j["measured"]],
    }
    if page is not None:
        write_claimed(claims[page], _page(summary))
    write_claimed(claims[report], (json.dumps(summary, indent=1) + "\n").encode())
    logger.info("%d jobs, %d measured, %.1f s in all", len(jobs), len(measured), summary["total_wall_s"])
    return summary


def _cell(value: float | None, fmt: str) -> str:
    return "<td>-</td>" if value is None else f"<td>{fmt.format(value)}</td>"


def _page(summary: dict[str, Any]) -> bytes:
    rows = []
    for job in summary["jobs"]:
        if job["measured"]:
            cells = _cell(job["wall_s"], "{:.1f}") + _cell(job["max_rss_mib"], "{:.0f}") + _cell(job["cpu_s"], "{:.1f}")
        else:
            cells = '<td colspan="3">not measured (no benchmark file)</td>'
        rows.append(f"<tr><th>{html.escape(job['job'])}</th>{cells}</tr>")
    body = f"""<p>Each job's last run as Snakemake measured it (<code>benchmarks/</code>): wall time, peak resident
memory of the job's processes, CPU time. {summary["total_wall_s"]:.1f} s in all; the largest peak
{summary["max_rss_mib"]:.0f} MiB.</p>
<table><tr><th>job</th><th>wall (s)</th><th>peak RSS (MiB)</th><th>CPU (s)</th></tr>
{chr(10).join(rows)}
</table>"""
    model = summary["model"]
    return html_page(f"Jobs of {model}", f"Jobs of {model}'s accuracy report", body)
