"""Time of a dry-run of ``all`` for 3 models x 4 precisions x 2 SM targets (run by hand; target < 3 s).

.venv/bin/python bench/plan_bench.py [--repeat 5]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from edgellm_steps.models.demo import make_checkpoint

REPO = Path(__file__).resolve().parent.parent
CONFIG = """\
defaults:
  precisions: [fp16, fp8, int8_sq, int4_awq]
  sm_targets: [89, 110]
models:
  model-a: {source: ckpt}
  model-b: {source: ckpt}
  model-c: {source: ckpt}
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        make_checkpoint(work / "ckpt", family="qwen2", hidden_size=128, intermediate_size=256)
        (work / "config.yaml").write_text(CONFIG)
        command = [str(Path(sys.executable).parent / "snakemake"), "--snakefile", str(REPO / "Snakefile")]
        command += ["--directory", str(work), "--dry-run", "--quiet", "all"]
        times = []
        for _ in range(args.repeat + 1):
            started = time.monotonic()
            subprocess.run(command, check=True, capture_output=True)
            times.append(time.monotonic() - started)
    warm = times[1:]
    print(f"dry-run of all (46 jobs): first {times[0]:.2f} s, then median {statistics.median(warm):.2f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
