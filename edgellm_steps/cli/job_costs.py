"""``edgellm-job-costs``: the wall time and peak memory of the jobs behind a model's accuracy report."""

from __future__ import annotations

import argparse

from edgellm_steps.cli import key_value, run_cli
from edgellm_steps.verify.job_costs import job_costs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="edgellm-job-costs", description=__doc__)
    parser.add_argument(
        "--benchmark",
        type=key_value("--benchmark", "JOB", "FILE"),
        action="append",
        required=True,
        metavar="JOB=FILE",
        help="a job's name and its Snakemake benchmark file (read if present); repeat in the chain's order",
    )
    parser.add_argument("--model", default="model", help="the model's name, for the title")
    parser.add_argument("--report", required=True, help="the JSON table")
    parser.add_argument("--page", default=None, help="the HTML page")
    args = parser.parse_args(argv)
    benchmarks = dict(args.benchmark)
    if len(benchmarks) != len(args.benchmark):
        parser.error("each job takes one --benchmark")
    return run_cli(lambda: job_costs(benchmarks, report=args.report, page=args.page, model=args.model))


if __name__ == "__main__":
    raise SystemExit(main())
