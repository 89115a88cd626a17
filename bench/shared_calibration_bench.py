"""One calibration pass for the precisions of a model: wall time and peak RSS against fp8 alone (by hand).

On the Qwen2.5-0.5B-shaped random checkpoint of ``bench.export_bench`` (generated once), 64 samples x 256
tokens of the built-in corpus on the CPU:

- fp8 alone as one ``edgellm-quantize-llm`` that calibrates on the text (each layer run on the cached states);
- fp8 alone from the shared pass: ``edgellm-calibrate-llm`` then ``edgellm-quantize-llm --statistics_dir``;
- fp8 + int8_sq + nvfp4 + fp8-kvfp8 from one shared pass (one calibrate-llm, four quantize-llm);
- int4_awq (AWQ's search needs the activations: its own pass, batch 16), the cost on top.

Target: the four precisions in at most 1.5x the time of fp8 alone (either way of making fp8 alone). Each step
is its own process, as the workflow runs them; the ratio counts every process's wall time.

    .venv/bin/python -m bench.shared_calibration_bench [--calib 64] [--tokens 256] [--no-awq]

Runs are appended to bench/results/shared_calibration_bench.json.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from .common import BIN, Measurement, bench_parser, module_command, record, run_measured, run_record

SHARED = ("fp8", "int8_sq", "nvfp4", "fp8-kvfp8")
TARGET_RATIO = 1.5


def main() -> int:
    parser = bench_parser(__doc__)
    parser.add_argument("--calib", type=int, default=64, help="calibration samples (default 64)")
    parser.add_argument("--tokens", type=int, default=256, help="tokens per sample (default 256)")
    parser.add_argument("--no-awq", action="store_true", help="skip the int4_awq run")
    args = parser.parse_args()
    checkpoint = args.workdir / "0.5b-checkpoint"
    if not (checkpoint / "config.json").is_file():
        subprocess.run(
            module_command("bench.export_bench", "0.5b", "--generate-only", "--workdir", str(args.workdir)), check=True
        )
    calibration = ["--calib_size", str(args.calib), "--calib_max_tokens", str(args.tokens), "--device", "cpu"]
    runs: list[dict] = []

    def step(case: str, tool: str, output: Path, *flags: str) -> Measurement:
        measured = run_measured([str(BIN / tool), "--model_dir", str(checkpoint), "--output_dir", str(output), *flags])
        runs.append(run_record(case, measured, samples=args.calib, tokens=args.tokens, checkpoint="0.5b"))
        print(f"| {case} | {measured.wall_s:.0f} | {measured.peak_rss_gb:.2f} |", flush=True)
        return measured

    print("| step | wall (s) | peak RSS (GB) |\n|---|---|---|")
    out = args.workdir / "shared-calibration"
    shutil.rmtree(out, ignore_errors=True)
    alone = step(
        "fp8 alone, calibrating on the text",
        "edgellm-quantize-llm",
        out / "fp8-alone",
        "--precision",
        "fp8",
        *calibration,
    ).wall_s
    shutil.rmtree(out / "fp8-alone")
    statistics = step(
        "calibrate-llm (the shared pass)", "edgellm-calibrate-llm", out / "statistics", *calibration
    ).wall_s
    shared = {}
    for precision in SHARED:
        shared[precision] = step(
            f"quantize-llm {precision} from the statistics",
            "edgellm-quantize-llm",
            out / precision,
            "--precision",
            precision,
            "--statistics_dir",
            str(out / "statistics"),
        ).wall_s
        shutil.rmtree(out / precision)
    fp8_shared = statistics + shared["fp8"]
    four = statistics + sum(shared.values())
    summary = {
        "fp8_alone_on_text_s": round(alone, 1),
        "fp8_alone_from_statistics_s": round(fp8_shared, 1),
        "four_from_one_pass_s": round(four, 1),
        "ratio_vs_fp8_on_text": round(four / alone, 2),
        "ratio_vs_fp8_from_statistics": round(four / fp8_shared, 2),
        "target_ratio": TARGET_RATIO,
    }
    if not args.no_awq:
        awq = step(
            "int4_awq (its own pass, batch 16)",
            "edgellm-quantize-llm",
            out / "int4_awq",
            "--precision",
            "int4_awq",
            *calibration,
        ).wall_s
        summary["int4_awq_on_top_s"] = round(awq, 1)
        summary["five_ratio_vs_fp8_on_text"] = round((four + awq) / alone, 2)
    shutil.rmtree(out, ignore_errors=True)
    runs.append({"case": "summary", **summary})
    for key, value in summary.items():
        print(f"{key}: {value}")
    if not args.no_record:
        record("shared_calibration_bench", runs, args.note)
    return 0 if max(summary["ratio_vs_fp8_on_text"], summary["ratio_vs_fp8_from_statistics"]) <= TARGET_RATIO else 1


if __name__ == "__main__":
    raise SystemExit(main())
