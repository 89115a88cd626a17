"""The accuracy report: its example plot, and what its CPU reference run costs (by hand, not in CI).

- ``tiny``: a tiny Qwen2 (hidden 128, 2 layers) trained for a few seconds on the built-in corpus
  (``models/demo/trained.py``), quantized to fp8, int8_sq, int4_awq and nvfp4 (32 samples x 64 tokens),
  each exported, then ``edgellm-accuracy-report`` over fp16 and the four on 8 x 128 held-out tokens. Its plot
  is the README's example, ``bench/results/accuracy_example.png``.
- ``0.5b`` and ``8b``: the Qwen2.5-0.5B- and Llama-3.1-8B-shaped random checkpoints of ``bench.export_bench``
  exported in fp16, and the report over that export alone (``--samples`` x ``--tokens``, fed 256 tokens at a
  time): how fast and in how much memory the graph runs one decoder layer at a time (tokens per second, peak
  RSS). Target for the 8B shape on 2048 tokens: at most 3 GB peak RSS.

    .venv/bin/python -m bench.accuracy_bench [tiny] [0.5b] [8b] [--samples 1] [--tokens 128]

Runs are appended to bench/results/accuracy_bench.json.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from .common import BIN, RESULTS, bench_parser, module_command, record, run_measured, run_record

PRECISIONS = ("fp8", "int8_sq", "int4_awq", "nvfp4")
EXAMPLE_PLOT = RESULTS / "accuracy_example.png"


def _tiny_checkpoint(workdir: Path) -> Path:
    """The trained tiny Qwen2, made once (in a separate process: its memory is not the measured steps')."""
    directory = workdir / "tiny-trained"
    if not (directory / "config.json").is_file():
        code = (
            "from pathlib import Path; import tempfile\n"
            "from edgellm_steps.models.demo import make_checkpoint\n"
            "from edgellm_steps.models.demo.trained import train_briefly\n"
            "from edgellm_steps.quant.calibration import corpus_texts\n"
            "with tempfile.TemporaryDirectory() as tmp:\n"
            "    random = make_checkpoint(Path(tmp) / 'r', family='qwen2', hidden_size=128, intermediate_size=256)\n"
            f"    train_briefly(random, Path({str(directory)!r}), corpus_texts(None))\n"
        )
        subprocess.run([sys.executable, "-c", code], check=True)
    return directory


def _report(exports: dict[str, Path], checkpoint: Path, out: Path, samples: int, tokens: int, case: str) -> dict:
    command = [str(BIN / "edgellm-accuracy-report"), "--model_dir", str(checkpoint), "--model", case]
    command += [f"--export={precision}={directory}" for precision, directory in exports.items()]
    command += ["--samples", str(samples), "--tokens", str(tokens), "--report", str(out / "accuracy.json")]
    command += ["--page", str(out / "accuracy.html"), "--plot", str(out / "accuracy.png")]
    measured = run_measured(command)
    report = json.loads((out / "accuracy.json").read_text())
    scored = len(exports) * samples * tokens
    figures = {
        name: {k: round(v, 6) for k, v in f.items() if k in ("perplexity", "top1_agreement", "mean_kl")}
        for name, f in report["precisions"].items()
    }
    run = run_record(
        f"accuracy-report {case}: {len(exports)} export(s), {samples} x {tokens} tokens",
        measured,
        exports=len(exports),
        samples=samples,
        tokens=tokens,
        tokens_per_s=round(scored / measured.wall_s, 1),
        figures=figures,
    )
    print(f"{case}: {measured.wall_s:.1f} s, {run['tokens_per_s']} tokens/s, {measured.peak_rss_gb} GB peak RSS")
    print(json.dumps(figures, indent=1))
    return run


def _step(tool: str, model_dir: Path, output_dir: Path, *flags: str) -> None:
    run_measured([str(BIN / tool), "--model_dir", str(model_dir), "--output_dir", str(output_dir), *flags])


def main() -> int:
    parser = bench_parser(__doc__)
    parser.add_argument("cases", nargs="*", default=["tiny", "0.5b"], choices=["tiny", "0.5b", "8b"])
    parser.add_argument("--samples", type=int, default=1, help="0.5b: windows of held-out text (default 1)")
    parser.add_argument("--tokens", type=int, default=128, help="0.5b: tokens per window (default 128)")
    args = parser.parse_args()
    runs = []
    if "tiny" in args.cases:
        checkpoint = _tiny_checkpoint(args.workdir)
        out = args.workdir / "accuracy-tiny"
        shutil.rmtree(out, ignore_errors=True)
        exports = {"fp16": out / "fp16"}
        _step("edgellm-export-llm", checkpoint, out / "fp16")
        for precision in PRECISIONS:
            quantized = out / f"q-{precision}"
            calibration = ("--calib_size", "32", "--calib_max_tokens", "64")
            _step("edgellm-quantize-llm", checkpoint, quantized, "--precision", precision, *calibration)
            exports[precision] = out / precision
            _step("edgellm-export-llm", quantized, out / precision)
        runs.append(_report(exports, checkpoint, out, 8, 128, "tiny"))
        shutil.copyfile(out / "accuracy.png", EXAMPLE_PLOT)
    for shape in ("0.5b", "8b"):
        if shape not in args.cases:
            continue
        checkpoint = args.workdir / f"{shape}-checkpoint"
        if not (checkpoint / "config.json").is_file():
            subprocess.run(
                module_command("bench.export_bench", shape, "--generate-only", "--workdir", str(args.workdir)),
                check=True,
            )
        out = args.workdir / f"accuracy-{shape}"
        shutil.rmtree(out, ignore_errors=True)
        _step("edgellm-export-llm", checkpoint, out / "fp16")
        runs.append(_report({"fp16": out / "fp16"}, checkpoint, out, args.samples, args.tokens, shape))
        shutil.rmtree(out, ignore_errors=True)
    if not args.no_record:
        record("accuracy_bench", runs, args.note)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
