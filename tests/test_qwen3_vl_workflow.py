"""A Qwen3-VL model through the real workflow: both language model precisions, the vision encoder, reports, plans."""

from __future__ import annotations

import json

import onnx
import pytest

from .support import NOTHING, WorkdirLayout, planned_jobs, run_snakemake, scenario, write_config

pytestmark = pytest.mark.workflow

#: The workdir fixture's layout: a tiny Qwen3-VL (rotary dim 16, not the runtime's 128) and the VLM config.
WORKDIR = WorkdirLayout(checkpoint="qwen3_vl", config=scenario("vlm"))
#: The fp16 language model's parity is test_export_llm's (its qwen3_vl case) and the fp8 one's quantize is
#: ModelOpt's exactly (test_layerwise's qwen3_vl case): here they are built and planned, the vision encoder verified.
REPORTS = ("onnx/vlm_fp16/llm/model.onnx", "reports/vlm/visual/verify.json")
FP8 = ("reports/vlm_fp8/verify.json", "engines/sm110/vlm_fp8.engine")


def test_qwen3_vl_builds_verified_exports_and_plans_its_engine(workdir):
    """The fp16 language model and the fp16 vision encoder, verified; planning names the runtime's rope limit
    once; the fp8 language model (calibrate, quantize, export, verify), the fp8 vision encoder and the SM110
    engine directory are planned (the fp8 tower's parity with ModelOpt's is proven in test_visual_qwen3)."""
    plan = run_snakemake(workdir, "-n", *REPORTS)
    assert planned_jobs(plan.output) == {"export_llm": 1, "export_visual": 1, "verify_visual": 1}
    warnings = [line for line in plan.output.splitlines() if line.startswith("Warning: model 'vlm'")]
    assert len(warnings) == 1, plan.output
    assert "rotary dim 16 with mrope_section [2, 3, 3]" in warnings[0]
    assert "supports rotary dim 128 with sections [24, 20, 20] only" in warnings[0]
    run_snakemake(workdir, *REPORTS)
    assert json.loads((workdir / REPORTS[1]).read_text())["passed"]
    assert json.loads((workdir / "onnx/vlm_fp16/llm/config.json").read_text())["rope_scaling"]["mrope_interleaved"]
    visual = json.loads((workdir / "onnx/vlm/visual/config.json").read_text())
    assert visual["vision_config"]["deepstack_visual_indexes"] == [0, 1, 3] and "edgellm_version" in visual
    graph = onnx.load(str(workdir / "onnx/vlm_fp16/llm/model.onnx"), load_external_data=False).graph
    assert [i.name for i in graph.input][-3:] == ["deepstack_embeds_0", "deepstack_embeds_1", "deepstack_embeds_2"]
    assert NOTHING in run_snakemake(workdir, "-n", *REPORTS).output
    write_config(workdir, scenario("vlm") + "    visual_precision: fp8\n")
    replan = run_snakemake(workdir, "-n", *REPORTS, *FP8)
    assert planned_jobs(replan.output) == {
        "calibrate_llm": 1,
        "quantize_llm": 1,
        "export_llm": 1,
        "verify_onnx": 1,
        "export_visual": 1,
        "verify_visual": 1,
        "build_visual_engine": 1,
        "build_engine": 1,
    }
    assert "--quantization fp8" in replan.output
