"""Wall time and peak RSS of ``edgellm-quantize-llm`` on CPU, and the export sizes it leads to (by hand).

Uses the Qwen2.5-0.5B-shaped random checkpoint of export_bench.py (generated once in a
separate process). For each precision and calibration size: quantize on the CPU with the
built-in corpus, export, and report wall time, peak RSS and the size of onnx_model.data.

    .venv/bin/python bench/quantize_bench.py --precisions fp8 int8_sq int4_awq --calib 32 [512]
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


def run_measured(command: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS GB) of one child process."""
    started = time.monotonic()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(process.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(command)}")
    return time.monotonic() - started, usage.ru_maxrss / 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--precisions", nargs="+", default=["fp8"])
    parser.add_argument("--calib", nargs="+", type=int, default=[32])
    parser.add_argument("--workdir", type=Path, default=Path("build/bench"))
    args = parser.parse_args()
    checkpoint = args.workdir / "0.5b-checkpoint"
    if not (checkpoint / "config.json").is_file():
        generate = [sys.executable, str(Path(__file__).with_name("export_bench.py")), "0.5b", "--generate-only"]
        subprocess.run([*generate, "--workdir", str(args.workdir)], check=True)
    fp16_dir = args.workdir / "0.5b-fp16"
    if not (fp16_dir / "onnx_model.data").is_file():
        run_measured([str(BIN / "edgellm-export-llm"), "--model_dir", str(checkpoint), "--output_dir", str(fp16_dir)])
    fp16_bytes = (fp16_dir / "onnx_model.data").stat().st_size
    print("| precision | calib samples | quantize wall (s) | quantize peak RSS (GB) | onnx_model.data (MB) | vs fp16 |")
    print("|---|---|---|---|---|---|")
    print(f"| fp16 | - | - | - | {fp16_bytes / 1e6:.0f} | 1.00 |", flush=True)
    for precision in args.precisions:
        for samples in args.calib:
            quantized = args.workdir / f"0.5b-{precision}-{samples}"
            onnx_dir = args.workdir / f"0.5b-{precision}-{samples}-onnx"
            command = [
                str(BIN / "edgellm-quantize-llm"),
                "--model_dir",
                str(checkpoint),
                "--output_dir",
                str(quantized),
            ]
            command += ["--quantization", precision, "--calib_size", str(samples), "--device", "cpu"]
            wall, rss = run_measured(command)
            run_measured(
                [str(BIN / "edgellm-export-llm"), "--model_dir", str(quantized), "--output_dir", str(onnx_dir)]
            )
            size = (onnx_dir / "onnx_model.data").stat().st_size
            print(
                f"| {precision} | {samples} | {wall:.0f} | {rss:.2f} | {size / 1e6:.0f} | {size / fp16_bytes:.2f} |",
                flush=True,
            )
            shutil.rmtree(quantized)
            shutil.rmtree(onnx_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
