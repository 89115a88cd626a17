"""Export beside a copy of its checkpoint, from a cold page cache and from a warm one (run by hand, not in CI).

Users export checkpoints downloaded long before, so the figure that matters is the cold one: the page
cache is dropped (``sync; echo 3 > /proc/sys/vm/drop_caches``, root only) before each cold step. In the
same run ``cp -r`` copies the same checkpoint, cold and warm, so the ratio export / copy says how close
the export comes to the speed of this disk whatever the disk is. Every timed step ends with ``sync``:
data still dirty in the page cache is not written yet, and the export and the copy write similar amounts.

    .venv/bin/python -m bench.cold_export_bench 8b                       # bench.export_bench's 8B checkpoint
    .venv/bin/python -m bench.cold_export_bench 0.5b
    .venv/bin/python -m bench.cold_export_bench --checkpoint DIR --label 8b-fp8 [--eagle-base]

``--checkpoint`` exports any checkpoint (a quantize-llm output: the export's precision is the
checkpoint's; ``bench.stretch_layers`` makes a few quantized layers into the 8B's 32). Without root
the caches cannot be dropped: the run says so and records ``cold: false``.
Targets (issue: the 8B fp16 export): cold export / cold cp at most 1.3, peak RSS at most 2 GB.
Runs are appended to bench/results/cold_export_bench.json.
"""

from __future__ import annotations

import logging
import os
import shutil
import statistics
import subprocess
import time
from pathlib import Path

from .common import BIN, Measurement, bench_parser, measure_command, module_command, record, run_record

log = logging.getLogger("cold_export_bench")

TARGET_RATIO = 1.3
TARGET_PEAK_GB = 2.0
DROP_CACHES = Path("/proc/sys/vm/drop_caches")


def drop_caches() -> bool:
    """Write back and drop the page cache; False when this process may not (not root)."""
    os.sync()
    try:
        DROP_CACHES.write_text("3\n")
    except OSError as err:
        log.warning("cannot drop the page cache (%s): the 'cold' figures below are not cold", err)
        return False
    return True


def warm_up(directory: Path) -> None:
    """Read every file of ``directory`` once, so that a warm step finds it in the page cache."""
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            with path.open("rb") as handle:
                while handle.read(64 << 20):
                    pass


def synced(command: list[str]) -> tuple[Measurement, float]:
    """Run ``command`` (it must succeed), then ``sync``: its measurement and the seconds until its data is on disk."""
    started = time.monotonic()
    code, measured = measure_command(command, stderr=None)
    if code != 0:
        raise SystemExit(f"failed (exit {code}): {' '.join(command)}")
    os.sync()
    return measured, time.monotonic() - started


def size_of(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


def bench_one(label: str, checkpoint: Path, workdir: Path, *, eagle_base: bool, threads: int | None) -> list[dict]:
    """Cold cp, cold export, warm cp, warm export of ``checkpoint``; one recorded run per export."""
    copy, output = workdir / f"{label}-copy", workdir / f"{label}-onnx"
    export = [str(BIN / "edgellm-export-llm"), "--model_dir", str(checkpoint), "--output_dir", str(output)]
    if eagle_base:
        export.append("--is_eagle_base")
    if threads is not None:
        export += ["--threads", str(threads)]
    runs = []
    for kind in ("cold", "warm"):
        shutil.rmtree(copy, ignore_errors=True)
        shutil.rmtree(output, ignore_errors=True)
        cold = drop_caches() if kind == "cold" else (warm_up(checkpoint) or False)
        _, cp_s = synced(["cp", "-r", str(checkpoint), str(copy)])
        shutil.rmtree(copy)
        if kind == "cold":
            drop_caches()
        else:
            warm_up(checkpoint)
        measured, export_s = synced(export)
        ratio = export_s / cp_s
        log.info(
            "%s %s: cp %.1f s, export %.1f s (%.2fx), peak RSS %s GB",
            label, kind, cp_s, export_s, ratio, measured.peak_rss_gb,
        )  # fmt: skip
        runs.append(
            run_record(
                f"{label} {kind}",
                measured,
                cache=kind,
                cold=cold if kind == "cold" else None,
                checkpoint_gb=round(size_of(checkpoint) / 1e9, 2),
                output_gb=round(size_of(output) / 1e9, 2),
                cp_synced_s=round(cp_s, 2),
                export_synced_s=round(export_s, 2),
                ratio=round(ratio, 3),
                eagle_base=eagle_base,
                threads=threads or len(os.sched_getaffinity(0)),
            )
        )
    shutil.rmtree(output, ignore_errors=True)
    return runs


def main() -> int:
    parser = bench_parser(__doc__)
    parser.add_argument("case", nargs="?", choices=["0.5b", "8b"], help="bench.export_bench's checkpoint")
    parser.add_argument("--checkpoint", type=Path, help="export this checkpoint instead")
    parser.add_argument("--label", help="the run's name in the results (default: the case or directory name)")
    parser.add_argument("--eagle-base", action="store_true", help="export the EAGLE3 base graph")
    parser.add_argument("--repeat", type=int, default=1, help="cold and warm pairs to run (the disk varies: 3 or more)")
    parser.add_argument("--threads", type=int, default=None, help="the export's --threads (default: its own)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if (args.case is None) == (args.checkpoint is None):
        parser.error("give a case or --checkpoint")
    checkpoint = args.checkpoint or args.workdir / f"{args.case}-checkpoint"
    if args.case and not (checkpoint / "config.json").is_file():
        generate = module_command("bench.export_bench", args.case, "--workdir", str(args.workdir), "--generate-only")
        subprocess.run(generate, check=True)
    label = args.label or args.case or checkpoint.name
    runs = []
    for _ in range(args.repeat):
        runs += bench_one(label, checkpoint, args.workdir, eagle_base=args.eagle_base, threads=args.threads)
    print("| run | cp + sync (s) | export + sync (s) | ratio | peak RSS (GB) | output (GB) |")
    print("|---|---|---|---|---|---|")
    for run in runs:
        print(
            f"| {run['case']} | {run['cp_synced_s']} | {run['export_synced_s']} | {run['ratio']} | "
            f"{run['peak_rss_printed_gb']} | {run['output_gb']} |"
        )
    for kind in ("cold", "warm"):
        ratios = [run["ratio"] for run in runs if run["cache"] == kind]
        print(f"{kind}: median ratio {statistics.median(ratios):.2f} over {len(ratios)} pair(s)")
    print(f"targets: cold ratio <= {TARGET_RATIO}, peak RSS <= {TARGET_PEAK_GB} GB (8B fp16)")
    if not all(run["cold"] in (True, None) for run in runs):
        print("the page cache could not be dropped (not root): the cold rows are not cold")
    if not args.no_record:
        record("cold_export_bench", runs, args.note)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
