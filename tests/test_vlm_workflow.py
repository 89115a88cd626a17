"""A vision-language model through the real workflow: both exports, their reports, and the engine plan.

The vision encoder export (``onnx/<model>/visual/``) belongs to the model, not to a language-model
precision: every LLM precision's engine shares it, and its own precision is the model's
``visual_precision``.
"""

from __future__ import annotations

import json

import pytest

from .support import NOTHING, WorkdirLayout, copy_checkpoint, planned_jobs, run_snakemake, scenario, write_config

pytestmark = pytest.mark.workflow

CONFIG = scenario("vlm")
VISUAL = "onnx/vlm/visual/model.onnx"

#: The workdir fixture's layout: a tiny Qwen2.5-VL checkpoint.
WORKDIR = WorkdirLayout(checkpoint="qwen2_5_vl", config=CONFIG)


def test_vlm_builds_both_exports_then_plans_nothing(workdir, checkpoint_factory):
    """The fp16 language model and the vision encoder (the demo test builds the fp8 language model through
    quantize, and verifies both through Snakemake)."""
    source = checkpoint_factory("qwen2_5_vl")
    targets = ("onnx/vlm_fp16/llm/model.onnx", VISUAL)
    run_snakemake(workdir, *targets)
    visual = workdir / "onnx/vlm/visual"
    assert json.loads((visual / "manifest.json").read_text())["step"] == "export-visual"
    assert (visual / "preprocessor_config.json").read_bytes() == (source / "preprocessor_config.json").read_bytes()
    llm = workdir / "onnx/vlm_fp16/llm"
    assert (llm / "preprocessor_config.json").read_bytes() == (source / "preprocessor_config.json").read_bytes()
    content_types = json.loads((llm / "processed_chat_template.json").read_text())["content_types"]
    assert set(content_types) == {"image", "video"}
    assert json.loads((llm / "config.json").read_text())["rope_scaling"]["mrope_section"] == [2, 3, 3]
    assert NOTHING in run_snakemake(workdir, "-n", *targets).output
    # The vision encoder's own precision reruns its export (and report), nothing of the language model.
    write_config(workdir, CONFIG + "    visual_precision: fp8\n")
    replan = run_snakemake(workdir, "-n", *targets, "onnx/vlm_fp8/llm/model.onnx")
    assert planned_jobs(replan.output) == {"export_visual": 1, "calibrate_llm": 1, "quantize_llm": 1, "export_llm": 1}
    assert "--quantization fp8" in replan.output


def test_vlm_engine_targets_plan_both_engines_and_share_the_vision_engine(workdir):
    plan = run_snakemake(workdir, "-n", "engines/vlm_fp16.engine", "engines/vlm_int8_sq.engine")
    assert planned_jobs(plan.output) == {
        "calibrate_llm": 1,
        "quantize_llm": 1,
        "export_llm": 2,
        "export_visual": 1,
        "build_visual_engine": 1,
        "build_engine": 2,
        "link_default_engine": 2,
    }
    jobs = plan.output.split("rule ")
    for rule in ("build_engine", "build_visual_engine"):
        for job in (j for j in jobs if j.startswith(f"{rule}:")):
            assert "gpu=1" in job and "constraint=sm87" in job, job
    engine_job = next(j for j in jobs if j.startswith("build_engine:"))
    assert "engines/sm87/visual/vlm.engine" in engine_job  # the vision engine is an input of the LLM engine


def test_fp8_vision_encoder_below_sm89_fails_at_planning(workdir):
    write_config(workdir, CONFIG + "    visual_precision: fp8\n")
    refused = run_snakemake(workdir, "-n", "engines/vlm_fp16.engine", check=False)
    assert refused.returncode != 0
    assert "model 'vlm': visual_precision fp8 needs SM >= 89, but this engine is for sm87" in refused.output
    # The export alone is not SM-specific; an SM89 engine plans.
    assert planned_jobs(run_snakemake(workdir, "-n", "engines/sm89/vlm_fp16.engine").output)["build_visual_engine"] == 1


def test_a_text_only_model_has_no_visual_target(tmp_path, checkpoint_factory):
    copy_checkpoint(checkpoint_factory("qwen2"), tmp_path / "ckpt")
    write_config(tmp_path, CONFIG)
    refused = run_snakemake(tmp_path, "-n", VISUAL, check=False)
    assert refused.returncode != 0
    assert "model 'vlm' is a text-only qwen2 model with no vision encoder" in refused.output
    # Its engine plan has no vision engine.
    assert "build_visual_engine" not in planned_jobs(run_snakemake(tmp_path, "-n", "engines/vlm_fp16.engine").output)


def test_the_readme_rule_graph_is_the_workflow_s(workdir):
    """The README draws the rule graph of a VLM's engine, verify and accuracy targets as Snakemake does."""
    import re

    from .support import REPO

    write_config(workdir, CONFIG + "    precisions: [fp8]\n    sm_targets: [110]\n")
    targets = ("engines/vlm_fp8.engine", "reports/vlm_fp8/verify.json", "reports/vlm/visual/verify.json")
    drawn = run_snakemake(workdir, "--rulegraph", "mermaid-js", "--", *targets, "reports/vlm/accuracy.json").stdout

    def edges(text: str) -> set[tuple[str, str]]:
        names = dict(re.findall(r"^\s*(id\d+)\[(\w+)\]", text, re.MULTILINE))
        return {(names[a], names[b]) for a, b in re.findall(r"^\s*(id\d+) --> (id\d+)", text, re.MULTILINE)}

    readme = (REPO / "README.md").read_text()
    assert edges(drawn) and edges(readme.split("```mermaid")[1].split("```")[0]) == edges(drawn)
