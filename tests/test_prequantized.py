"""Pre-quantized sources: recognized at planning, exported as the precision they hold, never unpickled."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from edgellm_steps.artifacts.tokenizer_files import TOKENIZER_ASSETS
from edgellm_steps.errors import PrecisionError, SourceError
from edgellm_steps.quant.precision import parse_precision
from edgellm_steps.quant.prequantized import HF_QUANT_CONFIG, MODELOPT_STATE, QUANT_INFO, held_precision
from edgellm_steps.quant.quantize_llm import quantize_llm
from edgellm_steps.workflow.planning import Planner

from .support import BIN, TINY_CASES, run_snakemake, scenario, tool_env, write_config

CALIB = {"calib_size": 4, "calib_max_tokens": 16}


def hf_quant_config(algo: str, kv: str | None = None, **extra) -> dict:
    """The file the classic quantize-llm writes beside its fake-quantized checkpoint (contract section 2)."""
    quantization = {"quant_algo": algo, "kv_cache_quant_algo": kv, "exclude_modules": ["lm_head"], **extra}
    return {"producer": {"name": "modelopt", "version": "0.37.0"}, "quantization": quantization}


def as_classic_checkpoint(quantized: Path, destination: Path, quant_config: dict) -> Path:
    """Our quantize output in the classic tool's form: its record replaced by ``hf_quant_config.json``."""
    shutil.copytree(quantized, destination, ignore=shutil.ignore_patterns(QUANT_INFO, "manifest.json"))
    (destination / HF_QUANT_CONFIG).write_text(json.dumps(quant_config))
    return destination


@pytest.fixture(scope="module")
def base(checkpoint_factory):
    return checkpoint_factory("qwen2", hidden_size=128, intermediate_size=256)


@pytest.fixture(scope="module")
def classic(base, tmp_path_factory):
    """A classic-layout FP8 + FP8-KV checkpoint, calibrated by ModelOpt."""
    root = tmp_path_factory.mktemp("classic")
    quantize_llm(base, root / "ours", precision="fp8-kvfp8", **CALIB)
    return as_classic_checkpoint(root / "ours", root / "classic", hf_quant_config("FP8", "FP8"))


def fake_layout(tmp_path: Path, quant_config: dict | None, *, state: bool = True) -> Path:
    """A directory with just the files that decide what a checkpoint holds."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    if quant_config is not None:
        (tmp_path / HF_QUANT_CONFIG).write_text(json.dumps(quant_config))
    if state:
        (tmp_path / MODELOPT_STATE).write_bytes(b"not read")
    return tmp_path


@pytest.mark.parametrize(
    ("quant_config", "expected"),
    [
        (hf_quant_config("FP8"), "fp8"),
        (hf_quant_config("FP8", "FP8"), "fp8-kvfp8"),
        (hf_quant_config("W8A8_SQ_PER_CHANNEL"), "int8_sq"),
        (hf_quant_config("W4A16_AWQ", group_size=128, has_zero_point=False, pre_quant_scale=True), "int4_awq"),
        (hf_quant_config("NVFP4", "FP8"), "nvfp4-kvfp8"),
        (hf_quant_config("NVFP4", exclude_modules=[]), "nvfp4-lmnvfp4"),
        (
            hf_quant_config("W4A16_AWQ", exclude_modules=[], quantized_layers={"lm_head": {"quant_algo": "FP8"}}),
            "int4_awq-lmfp8",
        ),
        (hf_quant_config("FP8", exclude_modules=["*lm_head*", "model.embed_tokens"]), "fp8"),
    ],
)
def test_classic_layouts_hold_their_precision(tmp_path, quant_config, expected):
    held = held_precision(fake_layout(tmp_path, quant_config), {})
    assert str(held.precision) == expected and held.origin == HF_QUANT_CONFIG


@pytest.mark.parametrize(
    ("quant_config", "state", "hf_quantization", "message"),
    [
        (hf_quant_config("W4A8_AWQ"), True, None, "quant_algo 'W4A8_AWQ' is not supported; supported pre-quantized"),
        (hf_quant_config("FP8", "INT8"), True, None, "kv_cache_quant_algo 'INT8' is not supported"),
        (hf_quant_config("FP8_PER_CHANNEL_PER_TOKEN"), False, None, "'FP8_PER_CHANNEL_PER_TOKEN' is not supported"),
        (hf_quant_config("W4A16_NVFP4"), False, None, "'W4A16_NVFP4' is not supported"),
        (hf_quant_config("MIXED_PRECISION"), False, None, "'MIXED_PRECISION' is not supported"),
        (hf_quant_config("fp8_pb_wo"), False, None, "'fp8_pb_wo' is not supported"),
        (hf_quant_config("W4A16_AWQ", exclude_modules=[]), True, None, "lm_head is not in exclude_modules"),
        ({"producer": {}}, True, None, "has no 'quantization' object"),
        (None, True, None, "carries modelopt_state.pth but no hf_quant_config.json"),
        (None, False, {"quant_method": "awq", "bits": 4}, "quant_method 'awq' is not supported"),
        (None, False, {"quant_method": "modelopt"}, "config.json: quant_algo None is not supported"),
        (None, False, {"quant_method": "compressed-tensors"}, "'compressed-tensors' is not supported; supported"),
        (None, False, {"quant_method": "bitsandbytes", "load_in_4bit": True}, "'bitsandbytes' is not supported"),
    ],
)
def test_unknown_quantized_layouts_are_refused(tmp_path, quant_config, state, hf_quantization, message):
    directory = fake_layout(tmp_path, quant_config, state=state)
    hf_config = {"quantization_config": hf_quantization} if hf_quantization else {}
    with pytest.raises(SourceError, match=message.replace("(", r"\(")) as err:
        held_precision(directory, hf_config)
    assert "\n" not in str(err.value)


def test_a_unified_export_is_named_by_either_of_its_records(tmp_path):
    """ModelOpt's unified export (no modelopt_state.pth) by hf_quant_config.json, or by config.json alone (0.30+
    spells the exclusions ``ignore`` and the FP8 KV cache ``kv_cache_scheme`` there)."""
    held = held_precision(fake_layout(tmp_path / "a", hf_quant_config("NVFP4", "FP8"), state=False), {})
    assert (str(held.precision), held.unified) == ("nvfp4-kvfp8", True)
    config = {
        "quant_method": "modelopt",
        "quant_algo": "FP8",
        "ignore": ["model.embed_tokens"],
        "kv_cache_scheme": {"dynamic": False, "num_bits": 8, "type": "float"},
    }
    held = held_precision(fake_layout(tmp_path / "b", None, state=False), {"quantization_config": config})
    assert (str(held.precision), held.unified, held.origin) == (
        "fp8-lmfp8-kvfp8",
        True,
        "config.json, ModelOpt unified export",
    )


def test_plain_checkpoints_hold_nothing(base):
    assert held_precision(base, json.loads((base / "config.json").read_text())) is None


def planner_for(source: Path) -> Planner:
    return Planner({"models": {"tiny": {"source": str(source)}}}, state_dir=source.parent / ".edgellm")


def test_planning_exports_a_classic_checkpoint_as_its_precision_only(classic):
    planner = planner_for(classic)
    assert planner.inputs.export_llm("tiny", "fp8-kvfp8") == {"source": planner.facts.model("tiny").source_stamps}
    for other in ("fp16", "fp8", "fp8-lmfp8-kvfp8", "int4_awq"):
        with pytest.raises(PrecisionError, match=r"already quantized as fp8-kvfp8 \(hf_quant_config.json\)"):
            planner.inputs.export_llm("tiny", other)


def test_our_own_quantized_checkpoint_as_a_source(classic, tmp_path):
    ours = classic.parent / "ours"
    assert held_precision(ours, {}).precision == parse_precision("fp8-kvfp8")
    with pytest.raises(PrecisionError, match="request precision fp8-kvfp8"):
        planner_for(ours).inputs.quantize_llm("tiny", "fp8")


def test_quantize_refuses_a_quantized_source(classic, tmp_path):
    with pytest.raises(PrecisionError, match="already quantized as fp8-kvfp8"):
        quantize_llm(classic, tmp_path / "again", precision="fp8", **CALIB)
    assert not (tmp_path / "again").exists()


def test_classic_checkpoint_in_the_workflow(classic, tmp_path):
    """No quantize job; the export matches the fake-quantized model restored weights-only."""
    shutil.copytree(classic, tmp_path / "classic")
    write_config(tmp_path, scenario("one_model", model="classic", source="classic"))
    report = "reports/classic_fp8-kvfp8/verify.json"
    plan = run_snakemake(tmp_path, "-n", report).output
    assert "quantize_llm" not in plan and "export_llm" in plan and "verify_onnx" in plan
    run_snakemake(tmp_path, report)
    summary = json.loads((tmp_path / report).read_text())
    assert summary["passed"] and summary["precision"] == "fp8-kvfp8"
    manifest = json.loads((tmp_path / "onnx/classic_fp8-kvfp8/llm/manifest.json").read_text())
    assert manifest["parameters"]["precision"] == "fp8-kvfp8"
    refused = run_snakemake(tmp_path, "-n", "onnx/classic_fp16/llm/model.onnx", check=False)
    errors = [line for line in refused.output.splitlines() if line.startswith("Error")]
    assert refused.returncode != 0 and len(errors) == 1 and "Traceback" not in refused.output
    assert "already quantized as fp8-kvfp8" in errors[0] and "request precision fp8-kvfp8" in errors[0]


class CreatesADirectory:
    """Unpickling this runs ``os.mkdir(path)``: a stand-in for any code a crafted pickle runs."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return os.mkdir, (self.path,)


def run_cli(tool: str, *args: str) -> subprocess.CompletedProcess:
    env = {**tool_env(), "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"}  # ModelOpt's docs suggest setting it
    return subprocess.run([str(BIN / tool), *args], env=env, capture_output=True, text=True)


def test_a_crafted_modelopt_state_is_never_unpickled(classic, base, tmp_path):
    marker = tmp_path / "pwned"
    crafted = shutil.copytree(classic, tmp_path / "crafted")
    torch.save({"modelopt_state_dict": CreatesADirectory(str(marker))}, crafted / MODELOPT_STATE)

    exported = run_cli("edgellm-export-llm", "--model_dir", str(crafted), "--output_dir", str(tmp_path / "llm"))
    assert exported.returncode == 0, exported.stderr[-2000:]
    verified = run_cli("edgellm-verify-onnx", "--onnx_dir", str(tmp_path / "llm"), "--model_dir", str(crafted))
    assert verified.returncode == 2 and "Traceback" not in verified.stderr
    last = verified.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "refused by the weights-only loader" in last

    plain = shutil.copytree(base, tmp_path / "plain")
    shutil.copyfile(crafted / MODELOPT_STATE, plain / MODELOPT_STATE)
    quantized = run_cli(
        "edgellm-quantize-llm", "--model_dir", str(plain), "--output_dir", str(tmp_path / "q"), "--precision", "fp8"
    )
    assert quantized.returncode == 2 and "Traceback" not in quantized.stderr
    assert "carries modelopt_state.pth but no hf_quant_config.json" in quantized.stderr.strip().splitlines()[-1]
    assert not marker.exists()
    assert not (tmp_path / "q").exists()


@pytest.mark.parametrize("case", sorted(TINY_CASES))
def test_quantize_copies_tokenizer_files_byte_for_byte(checkpoint_factory, case, tmp_path):
    source = checkpoint_factory(case)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("A few words of calibration text, enough for one short sample.\n")
    quantize_llm(source, tmp_path / "q", precision="fp8", dataset_dir=str(corpus), calib_size=1, calib_max_tokens=8)
    present = [name for name in TOKENIZER_ASSETS if (source / name).is_file()]
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(present)
    for name in present:
        assert (tmp_path / "q" / name).read_bytes() == (source / name).read_bytes(), name


MODELOPT_RESTORE = """
import sys, numpy as np, torch, transformers, modelopt.torch.opt as mto
from edgellm_steps.quant.nvfp4 import cpu_fake_quantization
mto.enable_huggingface_checkpointing()
model = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32).eval()
with torch.no_grad(), cpu_fake_quantization():
    logits = model(torch.from_numpy(np.load(sys.argv[2]))).logits
np.save(sys.argv[3], logits.numpy())
"""


def test_weights_only_restore_equals_modelopts_own_restore(classic, tmp_path):
    """Our loader (weights-only state + quantizer tensors) builds the model ModelOpt's HF checkpointing builds.

    ModelOpt's restore runs in a child process: it patches transformers for the whole process.
    """
    from edgellm_steps.quant.nvfp4 import cpu_fake_quantization
    from edgellm_steps.verify.reference_models import load_reference_model

    ours = classic.parent / "ours"  # our own output: its modelopt_state.pth is trusted here
    plain = load_reference_model(classic, None, torch.float32)  # the float weights, quantizers ignored
    mine = load_reference_model(classic, held_precision(classic, {}), torch.float32)
    ids = torch.randint(0, mine.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    np.save(tmp_path / "ids.npy", ids.numpy())
    child = [
        str(BIN / "python"),
        "-c",
        MODELOPT_RESTORE,
        str(ours),
        str(tmp_path / "ids.npy"),
        str(tmp_path / "out.npy"),
    ]
    result = subprocess.run(child, env=tool_env(), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    expected = torch.from_numpy(np.load(tmp_path / "out.npy"))
    with torch.no_grad(), cpu_fake_quantization():
        got, unquantized = mine(ids).logits, plain(ids).logits
    assert torch.equal(got, expected)
    assert not torch.allclose(unquantized, expected, rtol=0, atol=1e-4)  # the quantizers are really active


def test_export_refuses_a_record_the_weights_contradict(classic, tmp_path):
    """hf_quant_config.json claims a quantized lm_head; the checkpoint has no lm_head quantizer tensors."""
    from edgellm_steps.export.export_llm import export_llm

    lying = as_classic_checkpoint(
        classic.parent / "ours", tmp_path / "lying", hf_quant_config("FP8", "FP8", exclude_modules=[])
    )
    assert str(held_precision(lying, {}).precision) == "fp8-lmfp8-kvfp8"
    with pytest.raises(SourceError, match="the lm_head lacks calibrated quantizer tensors, but the precision record"):
        export_llm(lying, tmp_path / "llm")
    assert not (tmp_path / "llm").exists()
