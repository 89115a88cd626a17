"""A Qwen3-VL model through the real workflow: its language model export and report, the engine plan."""

from __future__ import annotations

import json

import onnx
import pytest
from safetensors import safe_open

from .support import NOTHING, WorkdirLayout, planned_jobs, run_snakemake, scenario, write_config

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


def test_fp8_language_model_and_both_vision_encoders_build_verified_and_the_engine_plans(workdir):
    """The rest of the matrix: fp8 through quantize-llm, the vision encoder in fp16 then fp8, all verified."""
    targets = ("reports/vlm_fp8/verify.json", "reports/vlm/visual/verify.json")
    run_snakemake(workdir, *targets)
    for report in targets:
        assert json.loads((workdir / report).read_text())["passed"], report
    # quantize-llm quantized the decoder's GEMMs only; the fp8 graph keeps the deepstack inputs.
    with safe_open(str(workdir / "quantized/vlm_fp8/model.safetensors"), "pt") as shard:
        quantizers = [name for name in shard.keys() if "_quantizer." in name]  # noqa: SIM118 (no dict)
    assert any(n.startswith("model.language_model.layers.2.mlp.down_proj.weight_quantizer") for n in quantizers)
    assert not [n for n in quantizers if "visual" in n]
    graph = onnx.load(str(workdir / "onnx/vlm_fp8/llm/model.onnx"), load_external_data=False).graph
    assert [i.name for i in graph.input][-3:] == ["deepstack_embeds_0", "deepstack_embeds_1", "deepstack_embeds_2"]
    visual = json.loads((workdir / "onnx/vlm/visual/config.json").read_text())
    assert visual["vision_config"]["deepstack_visual_indexes"] == [0, 1, 3] and "edgellm_version" in visual
    write_config(workdir, scenario("vlm") + "    visual_precision: fp8\n")
    assert planned_jobs(run_snakemake(workdir, "-n", *targets).output) == {"export_visual": 1, "verify_visual": 1}
    run_snakemake(workdir, *targets)
    report = json.loads((workdir / "reports/vlm/visual/verify.json").read_text())
    assert report["precision"] == "fp8" and report["passed"], report
    plan = run_snakemake(workdir, "-n", "engines/sm110/vlm_fp8.engine")
    assert planned_jobs(plan.output) == {"build_visual_engine": 1, "build_engine": 1}
