"""Time of a dry-run of ``all`` for 3 models x 4 precisions x 2 SM targets (run by hand; target < 3 s).

    .venv/bin/python -m bench.plan_bench [--repeat 5] [--note TEXT] [--no-record]

Run from the checkout's root. The first dry-run is reported apart from the median of the others:
it pays for cold caches (Python bytecode, the checkpoint's digests). Measured runs (with each run's
peak RSS, Snakemake's own ru_maxrss): bench/results/plan_bench.json (each run appends to it).
"""

from __future__ import annotations

import logging
import statistics
import tempfile
from pathlib import Path

from edgellm_steps.models.demo import make_checkpoint

from .common import BIN, REPO, bench_parser, record, run_measured, run_record

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
    parser = bench_parser(__doc__, workdir=False)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        make_checkpoint(work / "ckpt", family="qwen2", hidden_size=128, intermediate_size=256)
        (work / "config.yaml").write_text(CONFIG)
        command = [str(BIN / "snakemake"), "--snakefile", str(REPO / "Snakefile")]
        command += ["--directory", str(work), "--dry-run", "--quiet", "all"]
        runs = [run_measured(command) for _ in range(args.repeat + 1)]
    warm = [run.wall_s for run in runs[1:]]
    print(f"dry-run of all (46 jobs): first {runs[0].wall_s:.2f} s, then median {statistics.median(warm):.2f} s")
    if not args.no_record:
        details = {"jobs": 46, "target_s": 3}
        recorded = [run_record("dry-run of all, first", runs[0], **details)]
        recorded += [run_record("dry-run of all, repeated", run, **details) for run in runs[1:]]
        record("plan_bench", recorded, args.note)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
