"""An InternVL3 model through the real workflow: both exports verified, the engine directory planned in tiles."""

from __future__ import annotations

import json

import pytest

from .support import NOTHING, WorkdirLayout, planned_jobs, run_snakemake, scenario, write_config

pytestmark = pytest.mark.workflow

WORKDIR = WorkdirLayout(checkpoint="internvl", config=scenario("vlm"))
#: Both exports' parity with transformers is test_internvl's: here they are built and verified through the rules.
REPORTS = ("reports/vlm_fp16/verify.json", "reports/vlm/visual/verify.json")
ENGINE = "engines/sm87/vlm_fp16.engine"


def test_internvl_builds_verified_exports_and_plans_its_engine_in_tiles(workdir):
    """The fp16 language model and vision encoder verified; the engine directory (vision engine inside) planned
    with whole-tile image limits; an fp8 language model planned through quantize; limits that are not whole tiles
    refused at planning in one line."""
    plan = run_snakemake(workdir, "-n", *REPORTS)
    assert planned_jobs(plan.output) == {"export_llm": 1, "verify_onnx": 1, "export_visual": 1, "verify_visual": 1}
    # The tiny tokenizer's image brackets are not the ids the runtime writes: planning says so, once.
    [warning] = [line for line in plan.output.splitlines() if line.startswith("Warning: model 'vlm'")]
    assert "<img> / </img> ids are 3 / 4, but the Edge-LLM runtime's InternVL runner writes 151665 / 151666" in warning
    run_snakemake(workdir, *REPORTS)
    for report in REPORTS:
        assert json.loads((workdir / report).read_text())["passed"], report
    visual = json.loads((workdir / "onnx/vlm/visual/config.json").read_text())
    assert visual["model_type"] == "internvl" and visual["vision_config"]["image_size"] == [64, 64]
    assert json.loads((workdir / "onnx/vlm_fp16/llm/config.json").read_text())["model"] == "internvl"
    assert NOTHING in run_snakemake(workdir, "-n", *REPORTS).output

    engine = run_snakemake(workdir, "-n", "-p", ENGINE, "reports/vlm_fp8/verify.json")
    assert planned_jobs(engine.output) == {
        "build_visual_engine": 1,
        "build_engine": 1,
        "calibrate_llm": 1,
        "quantize_llm": 1,
        "export_llm": 1,
        "verify_onnx": 1,
    }
    # A one-tile image up to a 12-tile image with its thumbnail, in 256-token tiles.
    assert "--max_image_tokens 3328 --max_image_tokens_per_image 3328 --min_image_tokens 256" in engine.output

    write_config(workdir, scenario("vlm") + "    build: {max_image_tokens: 1000}\n")
    refused = run_snakemake(workdir, "-n", ENGINE, check=False)
    assert refused.returncode != 0 and "Traceback" not in refused.output
    [error] = [line for line in refused.output.splitlines() if line.startswith("Error")]
    assert "model 'vlm': build.max_image_tokens is 1000, but an InternVL vision engine runs whole tiles" in error
    assert "use a multiple of 256 (e.g. 1024)" in error
