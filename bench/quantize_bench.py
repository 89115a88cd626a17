"""Wall time and peak RSS of ``edgellm-quantize-llm`` on CPU, and the export sizes it leads to (by hand).

Uses the Qwen2.5-0.5B-shaped random checkpoint of export_bench.py (generated once in a
separate process). For each precision, calibration size and calibration batch: quantize on
the CPU with the built-in corpus, export, and report wall time, peak RSS and the size of
onnx_model.data. ``--verify`` also measures ``edgellm-verify-onnx`` (wall, peak RSS) on the
fp16 export and on each quantized export. These peaks are what the factors of
``edgellm_steps/workflow/resources.py`` (the workflow's mem_mb requests) come from.

    .venv/bin/python bench/quantize_bench.py --precisions fp8 int8_sq int4_awq --calib 32 [512]
    .venv/bin/python bench/quantize_bench.py --precisions int4_awq --calib 16 --batch 1 4 16 --no-export
    .venv/bin/python bench/quantize_bench.py --precisions --verify      # verify the fp16 export only
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

BIN = Path(sys.executable).parent
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def run_measured(command: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS GB) of one child process."""
    started = time.monotonic()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(process.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(command)}")
    return time.monotonic() - started, usage.ru_maxrss / 1e6


def verify_measured(onnx_dir: Path, model_dir: Path, threads: list[str]) -> str:
    """'wall | peak' cells of one verify-onnx run."""
    command = [str(BIN / "edgellm-verify-onnx"), "--onnx_dir", str(onnx_dir), "--model_dir", str(model_dir)]
    wall, rss = run_measured(command + threads)
    return f"{wall:.0f} | {rss:.2f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--precisions", nargs="*", default=["fp8"])
    parser.add_argument("--calib", nargs="+", type=int, default=[32])
    parser.add_argument(
        "--batch", nargs="+", type=int, default=[0], help="calibration batch sizes (0: the recipe's, 1 or 16 for AWQ)"
    )
    parser.add_argument("--tokens", type=int, default=512, help="tokens per calibration sample (default 512)")
    parser.add_argument("--no-export", action="store_true", help="quantize only (no export, no size)")
    parser.add_argument("--verify", action="store_true", help="also measure verify-onnx on each export")
    parser.add_argument("--threads", type=int, default=None, help="--threads of the steps (default: torch's)")
    parser.add_argument("--workdir", type=Path, default=Path("build/bench"))
    args = parser.parse_args()
    threads = ["--threads", str(args.threads)] if args.threads else []
    checkpoint = args.workdir / "0.5b-checkpoint"
    if not (checkpoint / "config.json").is_file():
        generate = [sys.executable, str(Path(__file__).with_name("export_bench.py")), "0.5b", "--generate-only"]
        subprocess.run([*generate, "--workdir", str(args.workdir)], check=True)
    from edgellm_steps.artifacts.checkpoint import weight_files

    weight_bytes = sum(p.stat().st_size for p in weight_files(checkpoint))
    print(f"checkpoint weight bytes: {weight_bytes} ({weight_bytes / 2**20:.0f} MiB)")
    fp16_dir = args.workdir / "0.5b-fp16"
    if not (fp16_dir / "onnx_model.data").is_file():
        run_measured([str(BIN / "edgellm-export-llm"), "--model_dir", str(checkpoint), "--output_dir", str(fp16_dir)])
    fp16_bytes = (fp16_dir / "onnx_model.data").stat().st_size
    print(
        "| precision | calib samples | batch | quantize wall (s) | quantize peak RSS (GB) | onnx_model.data (MB) "
        "| vs fp16 | verify wall (s) | verify peak RSS (GB) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    verify = verify_measured(fp16_dir, checkpoint, threads) if args.verify else "- | -"
    print(f"| fp16 | - | - | - | - | {fp16_bytes / 1e6:.0f} | 1.00 | {verify} |", flush=True)
    for precision in args.precisions:
        for samples in args.calib:
            for batch in args.batch:
                name = f"0.5b-{precision}-{samples}-b{batch}-t{args.tokens}"
                quantized = args.workdir / name
                onnx_dir = args.workdir / f"{name}-onnx"
                command = [
                    str(BIN / "edgellm-quantize-llm"),
                    "--model_dir",
                    str(checkpoint),
                    "--output_dir",
                    str(quantized),
                ]
                command += ["--precision", precision, "--calib_size", str(samples), "--device", "cpu"]
                command += ["--calib_max_tokens", str(args.tokens)]
                command += ["--calib_batch_size", str(batch)] if batch else []
                wall, rss = run_measured(command + threads)
                size_cells, verify = "- | -", "- | -"
                if not args.no_export:
                    run_measured(
                        [str(BIN / "edgellm-export-llm"), "--model_dir", str(quantized), "--output_dir", str(onnx_dir)]
                    )
                    size = (onnx_dir / "onnx_model.data").stat().st_size
                    size_cells = f"{size / 1e6:.0f} | {size / fp16_bytes:.2f}"
                    if args.verify:
                        verify = verify_measured(onnx_dir, quantized, threads)
                print(
                    f"| {precision} | {samples} | {batch or 'recipe'} | {wall:.0f} | {rss:.2f} | {size_cells} "
                    f"| {verify} |",
                    flush=True,
                )
                shutil.rmtree(quantized)
                shutil.rmtree(onnx_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
