"""Block-FP8 releases: dequantized once against transformers' own dequantization, refused at planning when
malformed, and built in fp16 and fp8 through the dequantize job."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from edgellm_steps.artifacts import steps
from edgellm_steps.artifacts.manifest import check_step_output
from edgellm_steps.errors import SourceError
from edgellm_steps.models.demo.block_fp8 import is_quantized_linear, write_block_fp8_checkpoint
from edgellm_steps.quant.block_fp8 import BLOCK
from edgellm_steps.quant.checkpoint_record import open_checkpoint
from edgellm_steps.quant.dequantize_fp8 import dequantize_fp8, dequantize_weight
from edgellm_steps.workflow.planning import Planner, load_workflow_config

from .support import (
    copy_checkpoint,
    planned_jobs,
    run_snakemake,
    scenario,
    weights_hashed_as_written,
    write_config,
)

#: k_proj / v_proj are 64 rows (one cropped block); every other Linear dim is a multiple of 128, so
#: transformers' loader (which derives the block from the scale grid) reads the whole release right.
RELEASE_DIMS = {"hidden_size": 256, "intermediate_size": 384, "num_key_value_heads": 1, "dtype": "bfloat16"}
#: Edge blocks on both axes of several blocks: 200 = 128 + 72, 320 = 2 x 128 + 64, k/v 100 rows.
EDGE_DIMS = {"hidden_size": 200, "intermediate_size": 320, "dtype": "bfloat16"}


@pytest.fixture(scope="module")
def release(checkpoint_factory, tmp_path_factory):
    return write_block_fp8_checkpoint(
        checkpoint_factory("qwen2", **RELEASE_DIMS), tmp_path_factory.mktemp("fp8") / "release"
    )


@pytest.fixture(scope="module")
def dequantized(release, tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        weights_hashed_as_written(patch)  # checked against the files by check_step_output below
        return dequantize_fp8(release, tmp_path_factory.mktemp("dequantized") / "out")


def test_dequantized_weights_equal_transformers_dequantization(release, dequantized):
    """Every tensor equals what transformers loads with FineGrainedFP8Config(dequantize=True) on the CPU: exactly
    (both multiply fp8 by the float32 scale in float32 and round once to bfloat16)."""
    from transformers import AutoModelForCausalLM, FineGrainedFP8Config

    reference = AutoModelForCausalLM.from_pretrained(
        str(release), quantization_config=FineGrainedFP8Config(dequantize=True), dtype=torch.bfloat16
    ).state_dict()
    ours = load_file(str(dequantized / "model.safetensors"))
    assert set(ours) == set(reference)
    assert [name for name in ours if not torch.equal(ours[name], reference[name])] == []
    assert sum(map(is_quantized_linear, ours)) == 14 and all(t.dtype == torch.bfloat16 for t in ours.values())

    # Negative controls: the scale read as a reciprocal (as its name suggests), or the block grid transposed
    # (q_proj's 2 x 2 blocks), or the fp8 codes unscaled, must all fail the same comparison.
    name = "model.layers.0.self_attn.q_proj.weight"
    with safe_open(str(release / "model.safetensors"), "pt") as handle:
        codes, scale = handle.get_tensor(name), handle.get_tensor(name.replace(".weight", ".weight_scale_inv"))
    assert torch.equal(dequantize_weight(codes, scale, BLOCK, torch.bfloat16), reference[name])
    for wrong in (1 / scale, scale.t(), torch.ones_like(scale)):
        assert not torch.equal(dequantize_weight(codes, wrong, BLOCK, torch.bfloat16), reference[name])


def test_edge_blocks_are_cropped_as_transformers_fp8_linear_reads_them(checkpoint_factory, tmp_path):
    """Dims that are not multiples of 128 on both axes, against transformers' block-size dequantization of
    FP8Linear (``_dequantize_fp8_weight``, in float32 then rounded once): exactly equal for every Linear.

    transformers' loader with dequantize=True cannot be the reference here: it derives the block from the
    scale grid (rows // grid rows), which refuses 320 rows in 3 blocks and reads k_proj's 200 columns as two
    blocks of 100; that reading is the negative control, and must differ from the cropped 128-blocks."""
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize, _dequantize_fp8_weight

    release = write_block_fp8_checkpoint(checkpoint_factory("qwen2", **EDGE_DIMS), tmp_path / "fp8")
    ours = load_file(str(dequantize_fp8(release, tmp_path / "out") / "model.safetensors"))
    stored = load_file(str(release / "model.safetensors"))
    checked = 0
    for name in filter(is_quantized_linear, stored):
        codes, scale = stored[name], stored[name.replace(".weight", ".weight_scale_inv")]
        expected = _dequantize_fp8_weight(codes, scale, list(BLOCK), torch.float32).to(torch.bfloat16)
        assert torch.equal(ours[name], expected), name
        checked += 1
    assert checked == 14 and stored["model.layers.0.mlp.gate_proj.weight"].shape == (320, 200)
    k_proj = "model.layers.0.self_attn.k_proj.weight"
    grid_derived = Fp8Dequantize(None)._dequantize_one(stored[k_proj], stored[k_proj + "_scale_inv"], torch.bfloat16)
    assert not torch.equal(grid_derived, ours[k_proj])


def test_everything_but_the_quantized_weights_travels_byte_for_byte(release, dequantized):
    manifest = check_step_output(dequantized, steps.DEQUANTIZE_FP8)
    assert manifest["parameters"]["dtype"] == "bfloat16" and manifest["parameters"]["dequantized_weights"] == 14
    with (
        safe_open(str(release / "model.safetensors"), "pt") as source,
        safe_open(str(dequantized / "model.safetensors"), "pt") as out,
    ):
        assert set(out.keys()) == {n for n in source.keys() if not n.endswith("_scale_inv")}  # noqa: SIM118
        untouched = [n for n in out.keys() if not is_quantized_linear(n)]  # noqa: SIM118 (safe_open is no dict)
        assert len(untouched) == len(out.keys()) - 14 > 0
        for name in untouched:
            assert source.get_tensor(name).view(torch.uint8).equal(out.get_tensor(name).view(torch.uint8)), name
        # Negative control: the same comparison sees a dequantized weight differ from its fp8 codes' bytes.
        quantized = "model.layers.1.mlp.down_proj.weight"
        assert not torch.equal(source.get_tensor(quantized).float(), out.get_tensor(quantized).float())
    for path in release.iterdir():
        if path.name not in ("model.safetensors", "config.json"):
            assert (dequantized / path.name).read_bytes() == path.read_bytes(), path.name
    config, source_config = (json.loads((d / "config.json").read_text()) for d in (dequantized, release))
    removed = source_config.pop("quantization_config")
    assert config == source_config and manifest["parameters"]["changed"]["config.json"]["removed"] == {
        "quantization_config": removed
    }
    # The output is a float source: steps open it as one; the release itself is refused, naming the fix.
    assert open_checkpoint(dequantized).held is None
    with pytest.raises(SourceError, match=r"dequantize it first \(edgellm-dequantize-fp8"):
        open_checkpoint(release)


def _damaged(release, tmp_path, *, config=None, tensors=None):
    damaged = shutil.copytree(release, tmp_path / "damaged")
    if config is not None:
        data = json.loads((damaged / "config.json").read_text())
        data["quantization_config"].update(config)
        (damaged / "config.json").write_text(json.dumps(data))
    if tensors is not None:
        weights = load_file(str(damaged / "model.safetensors"))
        save_file(tensors(weights), str(damaged / "model.safetensors"), metadata={"format": "pt"})
    return damaged


SCALE = "model.layers.1.mlp.down_proj.weight_scale_inv"


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (
            {"config": {"weight_block_size": [64, 64]}},
            r"weight_block_size \[64, 64\] is not accepted, only \[128, 128\]",
        ),
        ({"config": {"activation_scheme": "static"}}, "activation_scheme 'static' is not accepted, only 'dynamic'"),
        ({"tensors": lambda w: {k: v for k, v in w.items() if k != SCALE}}, f"{SCALE} is missing"),
        ({"tensors": lambda w: {**w, SCALE: w[SCALE].t().contiguous()}}, r"needs F32\|BF16\|F16 \[2, 3\]"),
        ({"tensors": lambda w: {k: v.to(torch.bfloat16) if v.dim() == 2 else v for k, v in w.items()}}, "no F8_E4M3"),
    ],
    ids=["block-64", "static-activations", "missing-scale", "transposed-scale", "float-weights"],
)
def test_planning_refuses_a_malformed_release_in_one_line(release, tmp_path, damage, message):
    damaged = _damaged(release, tmp_path, **damage)
    planner = Planner(load_workflow_config({"models": {"m": {"source": str(damaged)}}}), state_dir=tmp_path / "state")
    with pytest.raises(SourceError, match=message) as refused:
        planner.inputs.export_checkpoint("m", "fp16")
    assert "\n" not in str(refused.value)
    # Negative control: the undamaged release plans, from its dequantized checkpoint.
    fine = Planner(load_workflow_config({"models": {"m": {"source": str(release)}}}), state_dir=tmp_path / "ok")
    assert fine.inputs.export_checkpoint("m", "fp16") == "dequantized/m"


@pytest.mark.workflow
def test_fp16_and_fp8_exports_build_through_one_dequantize_job(release, tmp_path):
    copy_checkpoint(release, tmp_path / "ckpt")
    write_config(tmp_path, scenario("quantized"))
    targets = ["onnx/tiny_fp16/llm/model.onnx", "onnx/tiny_fp8/llm/model.onnx"]
    plan = run_snakemake(tmp_path, "-n", *targets)
    assert planned_jobs(plan.output) == {"dequantize_fp8": 1, "calibrate_llm": 1, "quantize_llm": 1, "export_llm": 2}
    run_snakemake(tmp_path, *targets)
    check_step_output(tmp_path / "dequantized/tiny", steps.DEQUANTIZE_FP8)
    check_step_output(tmp_path / "quantized/tiny_fp8", steps.QUANTIZE_LLM)
    for precision in ("fp16", "fp8"):
        manifest = check_step_output(tmp_path / f"onnx/tiny_{precision}/llm", steps.EXPORT_LLM)
        assert manifest["parameters"]["precision"] == precision


def test_jobs_are_sized_from_the_dequantized_bytes_and_the_measured_peak(release, dequantized, tmp_path):
    """Memory of the model's jobs counts its weights once dequantized (what quantize-llm and verify load), and
    the dequantize job requests at least the measured peak with the margin."""
    from edgellm_steps.workflow import resources

    planner = Planner(load_workflow_config({"models": {"m": {"source": str(release)}}}), state_dir=tmp_path)
    with safe_open(str(dequantized / "model.safetensors"), "pt") as out:
        data_bytes = sum(out.get_tensor(n).nbytes for n in out.keys())  # noqa: SIM118 (safe_open is no dict)
    release_bytes = (release / "model.safetensors").stat().st_size
    assert planner.facts.model("m").weight_bytes == data_bytes > release_bytes  # the release's bytes: too few
    runs = json.loads((resources.RESULTS.parent / "dequantize_bench.json").read_text())
    peak_mib = max(run["peak_rss_mib"] for run in runs)
    assert peak_mib <= resources.DEQUANTIZE_PEAK_MIB
    assert planner.resources.dequantize_mem_mb("m") >= resources.MARGIN * peak_mib
