"""Peak RSS and per-layer wall time of ``edgellm-quantize-llm`` on an 8B-shaped checkpoint (by hand, not in CI).

quantize-llm calibrates one decoder layer at a time (``edgellm_steps/quant/layerwise.py``), so its peak
memory should be about one layer in float32 plus the cached hidden states and one output shard, whatever
the number of layers. The checkpoint is ``bench.export_bench``'s Llama-3.1-8B shape (random bf16
weights, 16 GB), generated once in a separate process; ``--layers N`` writes one with N decoder layers
instead (same layer shapes: the peak does not depend on N, the wall time grows with it).

    .venv/bin/python -m bench.layerwise_quantize_bench --precisions fp8 int4_awq [--layers 4] [--calib 16]
    .venv/bin/python -m bench.layerwise_quantize_bench --precisions fp8 nvfp4 --shared   # calibrate-llm first

With ``--shared`` the statistics pass (``edgellm-calibrate-llm``) runs first and is measured as its own step;
every precision it serves is then made from it (``--statistics_dir``), int4_awq still on the text.

Target: at most 4 GB peak RSS (printed GB, as every bench prints it) with 16 samples x 128 tokens.
Runs are appended to bench/results/layerwise_quantize_bench.json with the seconds of every stage.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

from .common import BIN, bench_parser, measure_command, module_command, record, run_record

TARGET_PEAK_GB = 4.0
STAGE_LINE = re.compile(r"layer (\d+)/(\d+) (?:calibrated|observed) in ([0-9.]+) s")
STATISTICS_PRECISIONS = ("fp8", "int8_sq", "nvfp4")


def checkpoint_for(workdir: Path, layers: int | None) -> Path:
    """The 8B-shaped checkpoint (``layers`` decoder layers when given), generated once."""
    if layers is None:
        directory = workdir / "8b-checkpoint"
        if not (directory / "config.json").is_file():
            subprocess.run(
                module_command("bench.export_bench", "8b", "--generate-only", "--workdir", str(workdir)), check=True
            )
        return directory
    directory = workdir / f"8b-{layers}-layers-checkpoint"
    if not (directory / "config.json").is_file():
        code = (
            "import copy; from pathlib import Path; from bench.export_bench import CASES, write_checkpoint; "
            f"case = copy.deepcopy(CASES['8b']); case['num_hidden_layers'] = {layers}; "
            f"write_checkpoint(case, Path({str(directory)!r}))"
        )
        subprocess.run([sys.executable, "-c", code], check=True)
    return directory


def main() -> int:
    parser = bench_parser(__doc__, keep="keep the quantized checkpoints")
    parser.add_argument("--precisions", nargs="+", default=["fp8", "int4_awq"])
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default: the 8B's 32)")
    parser.add_argument("--calib", type=int, default=16, help="calibration samples (default 16)")
    parser.add_argument("--tokens", type=int, default=128, help="tokens per sample (default 128)")
    parser.add_argument("--shared", action="store_true", help="calibrate-llm first; precisions from its statistics")
    args = parser.parse_args()
    checkpoint = checkpoint_for(args.workdir, args.layers)
    layers = json.loads((checkpoint / "config.json").read_text())["num_hidden_layers"]
    weight_bytes = sum(p.stat().st_size for p in checkpoint.glob("*.safetensors"))
    rows = []
    calibration = ["--calib_size", str(args.calib), "--calib_max_tokens", str(args.tokens)]
    statistics = args.workdir / f"8b-{layers}-statistics"

    def measured_step(name: str, step: str, command: list[str], output: Path, **details) -> None:
        log_path = args.workdir / f"8b-{layers}-{name}.log"
        with log_path.open("w") as stderr:
            code, measured = measure_command(command, stderr=stderr)
        text = log_path.read_text(errors="replace")
        if code != 0:
            print("\n".join(text.splitlines()[-20:]))
            raise SystemExit(f"{step} {name} failed (exit {code}); log {log_path}")
        per_layer = [float(m.group(3)) for m in STAGE_LINE.finditer(text)]
        output_bytes = sum(p.stat().st_size for p in output.glob("*.safetensors"))
        run = run_record(
            f"{step} {name} 8B shape, {layers} layers",
            measured,
            step=step,
            layers=layers,
            samples=args.calib,
            tokens=args.tokens,
            weight_bytes=weight_bytes,
            output_bytes=output_bytes,
            layer_seconds=per_layer,
            mean_layer_s=round(sum(per_layer) / len(per_layer), 2) if per_layer else None,
            target_peak_rss_gb=TARGET_PEAK_GB,
            **details,
        )
        rows.append(run)
        if not args.no_record:
            record("layerwise_quantize_bench", [run], args.note)

    if args.shared:
        shutil.rmtree(statistics, ignore_errors=True)
        command = [str(BIN / "edgellm-calibrate-llm"), "--model_dir", str(checkpoint), "--output_dir", str(statistics)]
        measured_step("statistics", "calibrate-llm", command + calibration, statistics, precision="-")
    for precision in args.precisions:
        output = args.workdir / f"8b-{layers}-{precision}"
        shutil.rmtree(output, ignore_errors=True)
        command = [str(BIN / "edgellm-quantize-llm"), "--model_dir", str(checkpoint), "--output_dir", str(output)]
        command += ["--precision", precision]
        shared = args.shared and precision.split("-")[0] in STATISTICS_PRECISIONS
        command += ["--statistics_dir", str(statistics)] if shared else calibration
        measured_step(precision, "quantize-llm", command, output, precision=precision, from_statistics=shared)
        if not args.keep:
            shutil.rmtree(output, ignore_errors=True)
    if not args.keep:
        shutil.rmtree(statistics, ignore_errors=True)
    print("| precision | layers | wall (s) | mean per layer (s) | peak RSS (GB) | target |")
    print("|---|---|---|---|---|---|")
    for run in rows:
        print(
            f"| {run['precision']} | {run['layers']} | {run['wall_s']:.0f} | {run['mean_layer_s']} | "
            f"{run['peak_rss_printed_gb']} | <= {TARGET_PEAK_GB} |"
        )
    return 0 if all(run["peak_rss_printed_gb"] <= TARGET_PEAK_GB for run in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
