"""ModelOpt unified exports (NVIDIA's hub ``*-FP8`` / ``*-NVFP4`` / ``*-AWQ`` releases) as sources, proven
against ModelOpt itself.

Each fixture is one calibration by ModelOpt (the quantize step's own recipe) written twice: the
fake-quantized checkpoint quantize-llm writes, and ModelOpt's own ``export_hf_checkpoint`` of the same
calibrated model (``unified_checkpoint.py``). The unified export's stored tensors are dequantized as
ModelOpt dequantizes them; its graph has the fake path's interface and, where ModelOpt's two paths
round alike, its weight bytes; and verify passes it against the model dequantized from the stored
tensors (and, for fp8 and nvfp4, whose export re-smooths nothing, against the model as calibrated).

Where the bytes may differ, and why (ModelOpt's export, not ours): siblings sharing an input
(q/k/v, gate/up) are re-smoothed with one averaged ``pre_quant_scale`` (AWQ, SmoothQuant) or share one
NVFP4 second-level scale before packing, so their codes legitimately change; every other Linear (and
every FP8 one: FP8 siblings keep their own scales) must hold the same bytes, but for int8_sq, where
the export rounds ``w / (amax / 127)`` and the fake quantizer ``w * (127 / amax)``: one code in 10^4
lands a step apart. The fixtures are exported in float32, so both paths start from the same weights;
ModelOpt's bfloat16 export (as the hub's are made) would add its own roundings (a bfloat16 weight
divided by its scale in bfloat16 moves about 3% of FP8 codes by one step; a bfloat16 weight is 1/4
int8 step coarse near the top of the range).
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from edgellm_steps.artifacts.checkpoint import TensorStore
from edgellm_steps.export.export_llm import export_llm
from edgellm_steps.quant.prequantized import held_precision
from edgellm_steps.quant.quantize_llm import quantize_llm
from edgellm_steps.quant.unified import UnifiedStore, unpack_awq, unpack_fp4
from edgellm_steps.verify.verify_onnx import verify_onnx

from .support import planned_jobs, run_snakemake, write_config
from .unified_checkpoint import modelopt_dequantized_weight, write_unified

#: Every test reads the exports one Snakemake run builds (the ``workflow`` fixture).
pytestmark = pytest.mark.workflow

CALIB = {"calib_size": 8, "calib_max_tokens": 32}
#: The precisions the done-when names; quant_algo of each.
PRECISIONS = {
    "fp8": "FP8",
    "fp8-kvfp8": "FP8",
    "nvfp4": "NVFP4",
    "int4_awq": "W4A16_AWQ",
    "int8_sq": "W8A8_SQ_PER_CHANNEL",
}
#: Fraction of a Linear's weight bytes the two paths may differ in (see the module docstring); fp8 siblings
#: keep their own scales, so every fp8 Linear is compared, otherwise those without siblings.
SAME_BYTES = {"fp8": 0.0, "nvfp4": 0.0, "int4_awq": 0.0, "int8_sq": 0.001}
SIBLING_FREE = ("o_proj", "down_proj")


@pytest.fixture(scope="module")
def pair(checkpoint_factory, tmp_path_factory):
    """``pair(precision)`` -> (fake-quantized checkpoint, ModelOpt's unified export of it), made once."""
    base = checkpoint_factory("qwen2", hidden_size=128, intermediate_size=256, dtype="bfloat16")
    made = {}

    def make(precision: str):
        if precision not in made:
            root = tmp_path_factory.mktemp(f"unified-{precision}")
            quantize_llm(base, root / "fake", precision=precision, **CALIB)
            unified = write_unified(root / "fake", root / "unified", dtype=torch.float32)
            made[precision] = (root / "fake", unified)
        return made[precision]

    make.base = base
    return make


def _raw(directory) -> dict[str, torch.Tensor]:
    store = TensorStore(directory)
    return {name: store.get(name) for name in store.names()}


@pytest.mark.parametrize("precision", ["fp8", "nvfp4", "int4_awq", "int8_sq"])
def test_stored_weights_dequantize_as_modelopt_dequantizes_them(pair, precision):
    _, unified = pair(precision)
    held = held_precision(unified, json.loads((unified / "config.json").read_text()))
    assert (str(held.precision), held.unified) == (precision, True)
    store = UnifiedStore(TensorStore(unified), held.precision.weights, kv_fp8=False)
    raw = _raw(unified)
    assert len(store.quantized) == 14  # 7 Linears x 2 layers; lm_head and embeddings excluded
    for module in store.quantized:
        expected = modelopt_dequantized_weight(raw, module, PRECISIONS[precision])
        assert torch.equal(store.dequantized(module), expected), module
    # Controls: the other nibble order, or the scale read as a reciprocal, does not dequantize alike.
    module = store.quantized[0]
    codes, scale = raw[f"{module}.weight"], raw[f"{module}.weight_scale"]
    expected = modelopt_dequantized_weight(raw, module, PRECISIONS[precision])
    if precision == "nvfp4":
        swapped = unpack_fp4((codes << 4) | (codes >> 4)) * expected.abs().max()
        assert not torch.allclose(swapped, expected)
        assert not torch.equal(unpack_fp4((codes << 4) | (codes >> 4)), unpack_fp4(codes))
    elif precision == "int4_awq":
        assert not torch.equal(unpack_awq((codes << 4) | (codes >> 4)), unpack_awq(codes))
        wrong = unpack_awq((codes << 4) | (codes >> 4)).float() * scale.float().repeat_interleave(128, dim=1)
        assert not torch.equal(wrong, expected)
    else:
        per_row = scale.float().reshape(-1, 1) if scale.dim() else scale.float()
        assert not torch.allclose(codes.float() / per_row, expected)


def _graph(directory):
    model = onnx.load(str(directory / "model.onnx"))
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    interface = [(v.name, v.type.SerializeToString()) for v in [*model.graph.input, *model.graph.output]]
    return model, weights, interface


@pytest.fixture(scope="module")
def workflow(pair, tmp_path_factory):
    """Every unified fixture (one model each) exported and verified by one Snakemake run, with no quantize job;
    the workdir, its models by precision, and the plan."""
    workdir = tmp_path_factory.mktemp("unified-workflow")
    models = {precision: f"m{i}" for i, precision in enumerate(PRECISIONS)}
    lines = ["models:"]
    for precision, name in models.items():
        lines += [f"  {name}:", f"    source: {pair(precision)[1]}", "    sm_targets: [110]"]
    write_config(workdir, "\n".join(lines) + "\n")
    targets = [f"reports/{name}_{precision}/verify.json" for precision, name in models.items()]
    plan = run_snakemake(workdir, "-n", *targets)
    run_snakemake(workdir, *targets)
    return workdir, models, plan


def test_unified_sources_build_and_verify_through_the_workflow_without_quantizing(workflow):
    workdir, models, plan = workflow
    assert planned_jobs(plan.output) == {"export_llm": 5, "verify_onnx": 5}, plan.output  # no quantize job
    for precision, name in models.items():
        report = json.loads((workdir / f"reports/{name}_{precision}/verify.json").read_text())
        assert report["passed"] and report["precision"] == precision, (precision, report)
    refused = run_snakemake(workdir, "-n", f"onnx/{models['int4_awq']}_fp16/llm/model.onnx", check=False)
    assert refused.returncode != 0 and "already quantized as int4_awq" in refused.output


@pytest.mark.parametrize("precision", list(PRECISIONS))
def test_the_unified_export_equals_the_fake_path(pair, workflow, tmp_path, precision):
    fake, _ = pair(precision)
    workdir, models, _ = workflow
    built = workdir / f"onnx/{models[precision]}_{precision}/llm"
    export_llm(fake, tmp_path / "fake")
    _, want, want_io = _graph(tmp_path / "fake")
    model, got, got_io = _graph(built)
    assert got_io == want_io  # same inputs and outputs, names, types and shapes
    weights = precision.split("-")[0]
    compared = ("proj",) if weights == "fp8" else SIBLING_FREE
    checked = 0
    for name, value in got.items():
        module = name.removesuffix(".weight")
        if not (name.endswith(".weight") and module.endswith(compared)):
            continue
        a, b = np.ascontiguousarray(value).view(np.uint8), np.ascontiguousarray(want[name]).view(np.uint8)
        assert a.shape == b.shape, name
        assert (a != b).mean() <= SAME_BYTES[weights], (name, (a != b).mean())
        checked += 1
    assert checked == (14 if weights == "fp8" else 4)
    # The KV scales: ModelOpt's export writes k_scale = amax / 448 of the bfloat16-rounded amax.
    if precision.endswith("kvfp8"):
        scales = {n: v for n, v in got.items() if "k_v_scale" in n}
        assert scales and all(np.allclose(v, want[n], rtol=2e-2) for n, v in scales.items())
    # The workflow verified it against the model dequantized from the stored tensors; where the export changed
    # no weight beyond rounding (no re-smoothing: fp8, nvfp4), it verifies against the model as calibrated too.
    # AWQ's and SmoothQuant's averaged sibling scales change the model itself (int4_awq: 13.8% of max |logit|
    # on this random model).
    if precision in ("fp8", "nvfp4"):
        assert verify_onnx(built, fake)["passed"]
    assert model.opset_import[0].version >= 19


def test_a_lora_graph_of_a_unified_source_verifies_against_peft(pair, workflow, tmp_path):
    from edgellm_steps.lora.insert_lora import insert_lora

    from .test_lora import CASES, make_adapter

    _, unified = pair("int8_sq")
    workdir, models, _ = workflow
    shutil.copytree(workdir / f"onnx/{models['int8_sq']}_int8_sq/llm", tmp_path / "llm")
    insert_lora(tmp_path / "llm")
    _, adapter = make_adapter(pair.base, tmp_path / "adapter", CASES["llama"][1])
    assert verify_onnx(tmp_path / "llm", unified, adapter=adapter)["passed"]


def test_the_eagle_base_graph_reads_the_same_stored_weights(pair, workflow, tmp_path):
    _, unified = pair("nvfp4")
    workdir, models, _ = workflow
    export_llm(unified, tmp_path / "eagle_base", eagle_base=True)
    llm = workdir / f"onnx/{models['nvfp4']}_nvfp4/llm/onnx_model.data"
    assert (tmp_path / "eagle_base/onnx_model.data").read_bytes() == llm.read_bytes()
