"""A model with an EAGLE3 draft through the real workflow: both EAGLE exports, the engine plan, refusals."""

from __future__ import annotations

import json

import pytest

from edgellm_steps.models.demo import make_eagle3_draft

from .support import (
    NOTHING,
    WorkdirLayout,
    copy_checkpoint,
    flip_last_byte,
    planned_jobs,
    run_snakemake,
    scenario,
    write_config,
)

pytestmark = pytest.mark.workflow

CONFIG = scenario("eagle")
EXPORTS = ("onnx/tiny_fp16/eagle_base/model.onnx", "onnx/tiny_fp16/draft/model.onnx")


def _draft(workdir, base) -> None:
    """The config's draft: an EAGLE3 draft made for the base checkpoint."""
    make_eagle3_draft(workdir / "draft", base)


#: The workdir fixture's layout: a llama checkpoint and an EAGLE3 draft made for it.
WORKDIR = WorkdirLayout(checkpoint="llama", config=CONFIG, extras=_draft)


def test_eagle_exports_build_and_the_engine_plans_base_and_draft(workdir):
    run_snakemake(workdir, *EXPORTS)
    base = json.loads((workdir / "onnx/tiny_fp16/eagle_base/config.json").read_text())
    draft = json.loads((workdir / "onnx/tiny_fp16/draft/config.json").read_text())
    assert base["model_type"] == "eagle3_base" and draft["model_type"] == "eagle3_draft"
    assert (workdir / "onnx/tiny_fp16/draft/d2t.safetensors").is_file()
    assert NOTHING in run_snakemake(workdir, "-n", *EXPORTS).output
    plan = run_snakemake(workdir, "-n", "--printshellcmds", "engines/tiny_fp16.engine")
    assert planned_jobs(plan.output) == {"build_draft_engine": 1, "build_engine": 1, "link_default_engine": 1}
    jobs = plan.output.split("rule ")
    for rule in ("build_engine", "build_draft_engine"):
        job = next(j for j in jobs if j.startswith(f"{rule}:"))
        assert "gpu=1" in job and "constraint=sm110" in job, job
    engine_job = next(j for j in jobs if j.startswith("build_engine:"))
    assert "onnx/tiny_fp16/eagle_base/manifest.json" in engine_job
    assert "engines/sm110/draft/tiny_fp16.engine" in engine_job and "--draft_engine_dir" in engine_job
    # A changed draft reruns the draft export only; the base export stays.
    flip_last_byte(workdir / "draft/model.safetensors")
    assert planned_jobs(run_snakemake(workdir, "-n", *EXPORTS).output) == {"export_draft": 1}
    run_snakemake(workdir, *EXPORTS)
    # A changed base weight reruns the base export only: the draft export reads the base's config.json alone.
    flip_last_byte(workdir / "ckpt/model.safetensors")
    assert planned_jobs(run_snakemake(workdir, "-n", *EXPORTS).output) == {"export_eagle_base": 1}


def test_a_draft_that_does_not_fit_the_base_fails_at_planning(workdir):
    config_path = workdir / "draft/config.json"
    config = json.loads(config_path.read_text())
    config["target_hidden_size"] = 128
    config_path.write_text(json.dumps(config))
    refused = run_snakemake(workdir, "-n", "engines/tiny_fp16.engine", check=False)
    assert refused.returncode != 0
    assert "model 'tiny' draft (draft): the draft reads hidden states of width 128" in refused.output
    assert "the base's hidden size is 64" in refused.output


def test_eagle_targets_need_a_draft(tmp_path, checkpoint_factory):
    copy_checkpoint(checkpoint_factory("llama"), tmp_path / "ckpt")
    write_config(tmp_path, scenario("one_model", model="tiny", source="ckpt"))
    refused = run_snakemake(tmp_path, "-n", EXPORTS[1], check=False)
    assert refused.returncode != 0 and "model 'tiny' has no draft; add draft: {source:" in refused.output
    # Without a draft the engine is the plain LLM engine.
    assert planned_jobs(run_snakemake(tmp_path, "-n", "engines/sm110/tiny_fp16.engine").output) == {
        "export_llm": 1,
        "build_engine": 1,
    }


def test_a_reduced_vocabulary_serves_the_eagle_base_and_the_llm_export(workdir):
    write_config(workdir, CONFIG + "    reduced_vocab: {size: 120}\n")
    targets = ("onnx/tiny_fp16/eagle_base/model.onnx", "onnx/tiny_fp16/llm/model.onnx")
    assert planned_jobs(run_snakemake(workdir, "-n", *targets).output) == {
        "reduce_vocab": 1,
        "export_eagle_base": 1,
        "export_llm": 1,
    }
    run_snakemake(workdir, *targets, "onnx/tiny_fp16/draft/model.onnx")
    for kind in ("eagle_base", "llm"):
        assert json.loads((workdir / f"onnx/tiny_fp16/{kind}/config.json").read_text())["reduced_vocab_size"] == 120
        assert (workdir / f"onnx/tiny_fp16/{kind}/vocab_map.safetensors").is_file()
    # The size is recorded: a new one reruns the map and both exports, nothing else.
    write_config(workdir, CONFIG + "    reduced_vocab: {size: 150}\n")
    replan = run_snakemake(workdir, "-n", *targets, "onnx/tiny_fp16/draft/model.onnx")
    assert planned_jobs(replan.output) == {"reduce_vocab": 1, "export_eagle_base": 1, "export_llm": 1}


QUANTIZED_DRAFT_CONFIG = scenario("eagle_quantized_draft")


def test_a_quantized_draft_is_calibrated_through_the_base_and_exported(workdir):
    write_config(workdir, QUANTIZED_DRAFT_CONFIG)
    assert planned_jobs(run_snakemake(workdir, "-n", EXPORTS[1]).output) == {"quantize_draft": 1, "export_draft": 1}
    run_snakemake(workdir, EXPORTS[1])
    info = json.loads((workdir / "quantized/tiny/draft_fp8-kvfp8/edgellm_quantization.json").read_text())
    assert info["kind"] == "eagle3_draft" and info["calibration"]["samples"] == 4
    manifest = json.loads((workdir / "onnx/tiny_fp16/draft/manifest.json").read_text())
    assert manifest["parameters"]["precision"] == "fp8-kvfp8"
    assert NOTHING in run_snakemake(workdir, "-n", EXPORTS[1]).output
    # Calibration settings are the quantized draft's: a new one reruns it and the draft export only.
    write_config(workdir, QUANTIZED_DRAFT_CONFIG.replace("calib_size: 4", "calib_size: 5"))
    assert planned_jobs(run_snakemake(workdir, "-n", EXPORTS[1]).output) == {"quantize_draft": 1, "export_draft": 1}
    # An fp8 draft has no Orin (SM87) engine, whatever the base's precision: refused at planning.
    refused = run_snakemake(workdir, "-n", "engines/sm87/tiny_fp16.engine", check=False)
    assert refused.returncode != 0
    assert "model 'tiny' draft: precision 'fp8-kvfp8' uses fp8, which needs SM >= 89; sm87" in refused.output


def test_a_draft_precision_the_draft_cannot_take_fails_at_planning(workdir):
    write_config(workdir, QUANTIZED_DRAFT_CONFIG.replace("fp8-kvfp8", "int4_awq"))
    refused = run_snakemake(workdir, "-n", EXPORTS[1], check=False)
    assert refused.returncode != 0
    assert "model 'tiny' draft" in refused.output and "fc (3 x target_hidden_size)" in refused.output
    assert not (workdir / "quantized").exists()


def test_a_vlm_with_a_draft_plans_its_eagle_and_vision_engines(tmp_path, checkpoint_factory):
    base = checkpoint_factory("qwen2_5_vl")
    copy_checkpoint(base, tmp_path / "ckpt")
    make_eagle3_draft(tmp_path / "draft", base, nested_config=True)
    write_config(tmp_path, CONFIG)
    plan = run_snakemake(tmp_path, "-n", "--printshellcmds", "engines/tiny_fp16.engine")
    assert planned_jobs(plan.output) == {
        "export_eagle_base": 1,
        "export_draft": 1,
        "export_visual": 1,
        "build_draft_engine": 1,
        "build_visual_engine": 1,
        "build_engine": 1,
        "link_default_engine": 1,
    }
    engine_job = next(j for j in plan.output.split("rule ") if j.startswith("build_engine:"))
    assert "--draft_engine_dir" in engine_job and "--visual_engine_dir" in engine_job
