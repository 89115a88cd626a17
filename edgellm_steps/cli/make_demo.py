"""``edgellm-make-demo``: write the demo work directory (tiny checkpoint + config.yaml).

The checkpoint is a real Qwen2 architecture with seeded random weights and a
locally trained tokenizer, so the demo needs no network. Existing files are
kept: re-running the demo must not make its export stale.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from edgellm_steps.artifacts.atomic import write_if_changed
from edgellm_steps.cli import run_cli
from edgellm_steps.models.demo import make_checkpoint

log = logging.getLogger(__name__)

DEMO_CONFIG = """\
# Demo workflow config: one tiny local Qwen2 checkpoint.
models:
  demo-qwen2:
    source: checkpoints/demo-qwen2
    precisions: [fp16]
    sm_targets: [87]
"""


def make_demo(workdir: Path) -> None:
    checkpoint = workdir / "checkpoints" / "demo-qwen2"
    if (checkpoint / "config.json").is_file():
        log.info("demo checkpoint already at %s", checkpoint)
    else:
        make_checkpoint(checkpoint, family="qwen2", hidden_size=128, intermediate_size=384, num_hidden_layers=2)
    write_if_changed(workdir / "config.yaml", DEMO_CONFIG.encode())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="edgellm-make-demo", description=__doc__)
    parser.add_argument("--workdir", required=True, type=Path)
    args = parser.parse_args(argv)
    return run_cli(lambda: make_demo(args.workdir))


if __name__ == "__main__":
    raise SystemExit(main())
