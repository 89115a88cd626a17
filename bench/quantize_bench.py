"""Wall time and peak RSS of ``edgellm-quantize-llm`` on CPU, and the export sizes it leads to (by hand).

Uses the Qwen2.5-0.5B-shaped random checkpoint of ``bench.export_bench`` (generated once in a
separate process). For each precision, calibration size and calibration batch: quantize on
the CPU with the built-in corpus, export, and report wall time, peak RSS and the size of
onnx_model.data. ``--verify`` also measures ``edgellm-verify-onnx`` (wall, peak RSS) on the
fp16 export and on each quantized export. These peaks are what the factors of
``edgellm_steps/workflow/resources.py`` (the workflow's mem_mb requests) come from.

    .venv/bin/python -m bench.quantize_bench --precisions fp8 int8_sq int4_awq --calib 32 [512]
    .venv/bin/python -m bench.quantize_bench --precisions int4_awq --calib 16 --batch 1 4 16 --no-export
    .venv/bin/python -m bench.quantize_bench --precisions --verify      # verify the fp16 export only

Run from the checkout's root. Measured runs: bench/results/quantize_bench.json (each run appends
to it). A quantize run is recorded with ``kind`` (its weight format), ``batch`` (the calibration
batch it used) and ``samples``, and a verify run with ``kind`` "verify": the fields of
``resources.Measured``, so the memory model's figures can be read back from the file.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

from edgellm_steps.artifacts.checkpoint import weight_files
from edgellm_steps.quant.precision import parse_precision

from .common import BIN, Measurement, bench_parser, module_command, record, run_measured, run_record


def verify_measured(onnx_dir: Path, model_dir: Path, threads: list[str]) -> Measurement:
    """One verify-onnx run of ``onnx_dir`` against ``model_dir``."""
    command = [str(BIN / "edgellm-verify-onnx"), "--onnx_dir", str(onnx_dir), "--model_dir", str(model_dir)]
    return run_measured(command + threads)


def verify_record(export: str, measured: Measurement, model: dict) -> dict:
    """A verify run as the results file holds it: kind "verify", no batch or samples (as resources.Measured)."""
    case = f"verify-onnx {export} export"
    return run_record(case, measured, step="verify-onnx", kind="verify", batch=0, samples=0, export=export, **model)


def cells(measured: Measurement | None) -> str:
    """'wall | peak' table cells of a run, or '- | -' when there was none."""
    return f"{measured.wall_s:.0f} | {measured.peak_rss_gb:.2f}" if measured else "- | -"


def main() -> int:
    parser = bench_parser(__doc__)
    parser.add_argument("--precisions", nargs="*", default=["fp8"])
    parser.add_argument("--calib", nargs="+", type=int, default=[32])
    parser.add_argument(
        "--batch", nargs="+", type=int, default=[0], help="calibration batch sizes (0: the recipe's, 1 or 16 for AWQ)"
    )
    parser.add_argument("--tokens", type=int, default=512, help="tokens per calibration sample (default 512)")
    parser.add_argument("--no-export", action="store_true", help="quantize only (no export, no size)")
    parser.add_argument("--verify", action="store_true", help="also measure verify-onnx on each export")
    parser.add_argument("--threads", type=int, default=None, help="--threads of the steps (default: torch's)")
    args = parser.parse_args()
    threads = ["--threads", str(args.threads)] if args.threads else []
    checkpoint = args.workdir / "0.5b-checkpoint"
    if not (checkpoint / "config.json").is_file():
        generate = module_command("bench.export_bench", "0.5b", "--generate-only", "--workdir", str(args.workdir))
        subprocess.run(generate, check=True)
    weight_bytes = sum(p.stat().st_size for p in weight_files(checkpoint))
    print(f"checkpoint weight bytes: {weight_bytes} ({weight_bytes / 2**20:.0f} MiB)")
    model = {"checkpoint": "0.5b", "weight_bytes": weight_bytes}
    calibration = {"tokens": args.tokens, "device": "cpu", "corpus": "built-in", **model}

    def keep(run: dict) -> None:
        """Record each run as soon as it is measured: a long batch of runs that fails late keeps the earlier ones."""
        if not args.no_record:
            record("quantize_bench", [run], args.note)

    fp16_dir = args.workdir / "0.5b-fp16"
    if not (fp16_dir / "onnx_model.data").is_file():
        command = [str(BIN / "edgellm-export-llm"), "--model_dir", str(checkpoint), "--output_dir", str(fp16_dir)]
        keep(run_record("export-llm fp16", run_measured(command), step="export-llm", precision="fp16", **model))
    fp16_bytes = (fp16_dir / "onnx_model.data").stat().st_size
    print(
        "| precision | calib samples | batch | quantize wall (s) | quantize peak RSS (GB) | onnx_model.data (MB) "
        "| vs fp16 | verify wall (s) | verify peak RSS (GB) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    verify = verify_measured(fp16_dir, checkpoint, threads) if args.verify else None
    if verify:
        keep(verify_record("fp16", verify, model))
    print(f"| fp16 | - | - | - | - | {fp16_bytes / 1e6:.0f} | 1.00 | {cells(verify)} |", flush=True)
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
                quantize = run_measured(command + threads)
                info = json.loads((quantized / "edgellm_quantization.json").read_text())
                # Samples per forward pass as the memory model counts them: a batch above the samples is all of them.
                used_batch = min(info["calibration"]["batch_size"], samples)
                details = {"kind": parse_precision(precision).weights, "batch": used_batch, "samples": samples}
                case = f"quantize-llm {precision}, {samples} samples, batch {used_batch}"
                quantize_run = run_record(case, quantize, step="quantize-llm", precision=precision, **details)
                quantize_run.update(calibration)
                size_cells, verify = "- | -", None
                if not args.no_export:
                    run_measured(
                        [str(BIN / "edgellm-export-llm"), "--model_dir", str(quantized), "--output_dir", str(onnx_dir)]
                    )
                    size = (onnx_dir / "onnx_model.data").stat().st_size
                    quantize_run["onnx_model_data_mb"] = round(size / 1e6)
                    size_cells = f"{size / 1e6:.0f} | {size / fp16_bytes:.2f}"
                keep(quantize_run)
                if args.verify and not args.no_export:
                    verify = verify_measured(onnx_dir, quantized, threads)
                    keep(verify_record(precision, verify, model))
                print(
                    f"| {precision} | {samples} | {batch or 'recipe'} | {quantize.wall_s:.0f} | "
                    f"{quantize.peak_rss_gb:.2f} | {size_cells} | {cells(verify)} |",
                    flush=True,
                )
                shutil.rmtree(quantized)
                shutil.rmtree(onnx_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
