"""The demo work directory: a tiny Qwen2.5-VL checkpoint and the config that builds it, and what it built.

The checkpoint is a real Qwen2.5-VL architecture (decoder and vision tower) with seeded
random weights and a locally trained tokenizer, its language model then trained for a few seconds
on the built-in corpus (so its accuracy report means something), so the demo needs no network. Existing
files are kept: re-running the demo must not make its artifacts stale. Its targets are the
workflow's own paths (``workflow/targets.py``), so the Makefile asks for them by name.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

from edgellm_steps.artifacts.atomic import write_if_changed
from edgellm_steps.export.kinds import LLM, VISUAL
from edgellm_steps.graph.opsets import ONNX_NAME
from edgellm_steps.models.demo import make_checkpoint
from edgellm_steps.models.demo.trained import train_briefly
from edgellm_steps.quant.calibration import corpus_texts
from edgellm_steps.workflow import targets

log = logging.getLogger(__name__)

DEMO_MODEL = "demo-qwen2.5-vl"
DEMO_PRECISION = "fp8"
DEMO_CONFIG = f"""\
# Demo workflow config: one tiny local Qwen2.5-VL checkpoint, its language model in fp8
# (Jetson Thor, SM110, runs fp8) and its vision encoder in fp16.
models:
  {DEMO_MODEL}:
    source: checkpoints/{DEMO_MODEL}
    precisions: [{DEMO_PRECISION}]
    sm_targets: [110]
    quantization:
      calib_size: 16
      calib_max_tokens: 64
      threads: 2
"""
_WILDCARDS = {"model": DEMO_MODEL, "precision": DEMO_PRECISION}
#: What the demo builds, in the work directory: (what, directory).
DEMO_ARTIFACTS = (
    ("shared calibration statistics", targets.path(targets.CALIBRATION, **_WILDCARDS)),
    ("quantized checkpoint (ModelOpt fp8)", os.path.dirname(targets.path(targets.QUANTIZED, **_WILDCARDS))),
    ("language model ONNX export", targets.path(targets.export_dir(LLM), **_WILDCARDS)),
    ("vision encoder ONNX export", targets.path(targets.export_dir(VISUAL), **_WILDCARDS)),
)
DEMO_REPORTS = (
    ("language model vs transformers (fake-quantized)", targets.path(targets.VERIFY_REPORT, **_WILDCARDS)),
    ("vision encoder vs the transformers tower", targets.path(targets.VISUAL_REPORT, **_WILDCARDS)),
)
DEMO_ACCURACY = targets.path(targets.ACCURACY_REPORT, **_WILDCARDS)
DEMO_JOBS = targets.path(targets.JOB_COSTS, **_WILDCARDS)
#: Snakemake's report of the demo's targets (``make demo`` runs ``snakemake --report`` into it).
DEMO_SNAKEMAKE_REPORT = "report.html"
DEMO_ENGINE = targets.path(targets.DEFAULT_ENGINE, **_WILDCARDS)
#: What ``make demo`` builds: both exports, both verify reports, the accuracy report and its jobs' costs (the engine
#: is planned only).
DEMO_TARGETS = (
    targets.export_path(LLM, ONNX_NAME, DEMO_MODEL, DEMO_PRECISION),
    targets.export_path(VISUAL, ONNX_NAME, DEMO_MODEL),
    *(report for _, report in DEMO_REPORTS),
    DEMO_ACCURACY,
    DEMO_JOBS,
)


def make_demo(workdir: Path) -> None:
    """Write the demo checkpoint (once) and config.yaml (only when its content changes) into ``workdir``."""
    checkpoint = workdir / "checkpoints" / DEMO_MODEL
    if (checkpoint / "config.json").is_file():
        log.info("demo checkpoint already at %s", checkpoint)
    else:
        checkpoint.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=checkpoint.parent, prefix=".making-") as tmp:
            random = make_checkpoint(
                Path(tmp) / "random",
                family="qwen2_5_vl",
                hidden_size=128,
                intermediate_size=384,
                num_hidden_layers=2,
                # head_dim 32: the temporal, height and width sections cover its 16 rotary frequencies.
                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [4, 6, 6]},
            )
            os.replace(train_briefly(random, Path(tmp) / "trained", corpus_texts(None)), checkpoint)
    write_if_changed(workdir / "config.yaml", DEMO_CONFIG.encode())


def _size(directory: Path) -> str:
    files = [p for p in directory.rglob("*") if p.is_file()]
    total = sum(p.stat().st_size for p in files)
    return f"{total / 1e6:.1f} MB in {len(files)} files"


def demo_summary(workdir: Path) -> str:
    """What the demo built and where, with sizes and the parity figures of its reports."""
    workdir = workdir.resolve()
    lines = [f"Demo work directory: {workdir}", "Built:"]
    for what, path in DEMO_ARTIFACTS:
        directory = workdir / path
        state = _size(directory) if directory.is_dir() else "missing"
        lines.append(f"  {what:<38} {directory}/  ({state})")
    lines.append("Verified (max |error| / max |output|, min cosine over rows):")
    for what, path in DEMO_REPORTS:
        report = json.loads((workdir / path).read_text())
        cases = ", ".join(
            f"{name} {case['relative_error']:.2%} / {case['min_cosine']:.4f}" for name, case in report["cases"].items()
        )
        verdict = "passed" if report["passed"] else "FAILED"
        lines.append(f"  {what:<48} {report['precision']}: {verdict}; {cases}")
    accuracy = json.loads((workdir / DEMO_ACCURACY).read_text())
    lines.append(
        f"Accuracy on {accuracy['inputs']['scored_tokens']} held-out tokens ({workdir / DEMO_ACCURACY}, "
        f"{Path(targets.ACCURACY_PAGE).name} beside it):"
    )
    lines.append(f"  {'precision':<12}{'perplexity':>12}{'top-1 vs fp16':>15}{'KL vs fp16':>12}{'engine MB':>11}")
    for precision, figures in accuracy["precisions"].items():
        lines.append(
            f"  {precision:<12}{figures['perplexity']:>12.2f}{figures['top1_agreement']:>15.1%}"
            f"{figures['mean_kl']:>12.2e}{figures['engine_bytes_estimate'] / 1e6:>11.2f}"
        )
    jobs = json.loads((workdir / DEMO_JOBS).read_text())
    lines.append(
        f"Jobs: {len(jobs['jobs']) - len(jobs['not_measured'])} of {len(jobs['jobs'])} measured in "
        f"{workdir / DEMO_JOBS}, {jobs['total_wall_s']:.0f} s in all, "
        f"the largest peak {jobs['max_rss_mib']:.0f} MiB"
    )
    if (workdir / DEMO_SNAKEMAKE_REPORT).is_file():
        lines.append(f"Snakemake's report (accuracy, jobs, verify, rule graph): {workdir / DEMO_SNAKEMAKE_REPORT}")
    lines.append(f"Engine target (planned above, built on an SM110 GPU host): {workdir / DEMO_ENGINE}/")
    lines.append(f"  holds llm.engine and visual/visual.engine; logs in {workdir / 'logs'}/")
    return "\n".join(lines)
