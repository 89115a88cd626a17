"""edgellm-job-costs on files that are not Snakemake benchmarks: one line and exit 2, nothing written."""

from __future__ import annotations

import subprocess

from .support import BIN


def test_a_file_that_is_no_benchmark_is_refused_in_one_line(tmp_path):
    table = tmp_path / "other.tsv"
    table.write_text("foo\tbar\n1\t2\n")
    report = tmp_path / "jobs.json"
    result = subprocess.run(
        [str(BIN / "edgellm-job-costs"), "--benchmark", f"export={table}", "--report", str(report)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2 and not report.exists()
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: {table} lacks the column 'cpu_time': not a Snakemake benchmark file"
    )
