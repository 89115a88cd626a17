"""A Qwen3-VL model through the real workflow: its language model export and report, the engine plan."""

from __future__ import annotations

import json

import pytest

from .support import NOTHING, WorkdirLayout, planned_jobs, run_snakemake, scenario

pytestmark = pytest.mark.workflow

#: The workdir fixture's layout: a tiny Qwen3-VL (rotary dim 16, not the runtime's 128) and the VLM config.
WORKDIR = WorkdirLayout(checkpoint="qwen3_vl", config=scenario("vlm"))
LLM = ("onnx/vlm_fp16/llm/model.onnx", "reports/vlm_fp16/verify.json")


def test_the_language_model_builds_and_verifies_and_planning_names_the_runtime_rope_limit(workdir):
    plan = run_snakemake(workdir, "-n", *LLM)
    assert planned_jobs(plan.output) == {"export_llm": 1, "verify_onnx": 1}
    warnings = [line for line in plan.output.splitlines() if line.startswith("Warning: model 'vlm'")]
    assert len(warnings) == 1, plan.output
    assert "supports rotary dim 128 with sections [24, 20, 20] only" in warnings[0]
    assert "rotary dim 16 with mrope_section [2, 3, 3]" in warnings[0]
    run_snakemake(workdir, *LLM)
    report = json.loads((workdir / "reports/vlm_fp16/verify.json").read_text())
    assert report["passed"]
    config = json.loads((workdir / "onnx/vlm_fp16/llm/config.json").read_text())
    assert config["rope_scaling"]["mrope_interleaved"] is True
    assert NOTHING in run_snakemake(workdir, "-n", *LLM).output
