"""``edgellm-make-demo``: write the demo work directory (tiny VLM checkpoint + config.yaml), summarize it,
or print the targets ``make demo`` builds."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from edgellm_steps.cli import run_cli
from edgellm_steps.workflow.demo_workdir import DEMO_ENGINE, DEMO_TARGETS, demo_summary, make_demo


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="edgellm-make-demo", description=__doc__)
    parser.add_argument("--workdir", type=Path, help="the demo work directory (required unless --targets)")
    parser.add_argument("--summary", action="store_true", help="report what the demo built instead of setting it up")
    parser.add_argument(
        "--targets",
        choices=("build", "engine"),
        help="print the targets `make demo` builds (build) or plans (engine), one per line",
    )
    args = parser.parse_args(argv)
    if args.targets:
        chosen = DEMO_TARGETS if args.targets == "build" else (DEMO_ENGINE,)
        return run_cli(lambda: sys.stdout.write("\n".join(chosen) + "\n"))
    if args.workdir is None:
        parser.error("--workdir is required")
    if args.summary:
        return run_cli(lambda: sys.stdout.write(demo_summary(args.workdir) + "\n"))
    return run_cli(lambda: make_demo(args.workdir))


if __name__ == "__main__":
    raise SystemExit(main())
