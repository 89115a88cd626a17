"""Wall time and peak RSS of ``edgellm-dequantize-fp8`` on a real model shape (run by hand, not in CI).

The Qwen2.5-0.5B-shaped random checkpoint of ``bench.export_bench`` (494M parameters, bf16, shards of
``--shard-mb``) is turned into its block-FP8 release (``edgellm_steps.models.demo.block_fp8``, as
Qwen's ``*-FP8`` are made), each in a separate process, then dequantized alone. The peak is what
``DEQUANTIZE_PEAK_MIB`` of ``edgellm_steps/workflow/resources.py`` (the job's mem_mb) comes from.

    .venv/bin/python -m bench.dequantize_bench [--workdir DIR] [--keep] [--note TEXT] [--no-record]

Run from the checkout's root. Measured runs: bench/results/dequantize_bench.json (each run appends to it).
"""

from __future__ import annotations

import argparse
import logging
import shutil
import subprocess
import sys

from edgellm_steps.artifacts.checkpoint import weight_files
from edgellm_steps.models.demo.block_fp8 import write_block_fp8_checkpoint

from .common import bench_parser, module_command, record, run_measured, run_record
from .export_bench import CASES, write_checkpoint

log = logging.getLogger("dequantize_bench")
CASE = "0.5b"


def main() -> int:
    parser = bench_parser(__doc__, keep="keep the checkpoints")
    parser.add_argument("--shard-mb", type=int, default=400, help="source shard size (default 400 MB: 3 shards)")
    parser.add_argument("--generate-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    float_dir, release, output = (args.workdir / f"{CASE}-{kind}" for kind in ("float", "fp8", "dequantized"))
    if args.generate_only:
        write_checkpoint(CASES[CASE], float_dir, shard_bytes=args.shard_mb << 20)
        write_block_fp8_checkpoint(float_dir, release)
        return 0
    if not (release / "config.json").is_file():
        shutil.rmtree(float_dir, ignore_errors=True)
        shutil.rmtree(release, ignore_errors=True)
        generate = ["--workdir", str(args.workdir), "--shard-mb", str(args.shard_mb), "--generate-only"]
        subprocess.run(module_command("bench.dequantize_bench", *generate), check=True)
    shutil.rmtree(output, ignore_errors=True)
    command = [sys.executable, "-m", "edgellm_steps.cli.dequantize_fp8", "--model_dir", str(release)]
    measured = run_measured([*command, "--output_dir", str(output)])
    sizes = {d.name: sum(p.stat().st_size for p in weight_files(d)) for d in (float_dir, release, output)}
    print("| case | wall (s) | peak RSS (MiB) | release weights (GB) | dequantized weights (GB) |")
    print("|---|---|---|---|---|")
    print(
        f"| {CASE} | {measured.wall_s:.1f} | {measured.peak_rss_mib} | {sizes[release.name] / 1e9:.2f} "
        f"| {sizes[output.name] / 1e9:.2f} |"
    )
    if not args.no_record:
        details = {"release_weight_bytes": sizes[release.name], "dequantized_weight_bytes": sizes[output.name]}
        record("dequantize_bench", [run_record(CASE, measured, step="dequantize-fp8", **details)], args.note)
    if not args.keep:
        for directory in (float_dir, release, output):
            shutil.rmtree(directory, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
