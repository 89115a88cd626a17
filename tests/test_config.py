import re

import pytest
import yaml

from edgellm_steps.engine.limits import BuildLimits
from edgellm_steps.errors import ConfigError, EdgeLLMError
from edgellm_steps.workflow.config import model_settings, validate_config
from edgellm_steps.workflow.planning import load_workflow_config

from .support import REPO


def test_example_config_is_valid():
    config = yaml.safe_load((REPO / "config/config.yaml").read_text())
    validate_config(config)


def test_minimal_entry_gets_documented_defaults():
    settings = model_settings({"models": {"m": {"source": "x"}}}, "m")
    assert settings.precisions == ("fp16",)
    assert settings.sm_targets == (87,) and settings.default_sm == 87
    assert settings.chat_template is None
    assert vars(settings.build) == {
        "max_batch_size": 4,
        "max_input_len": 1024,
        "max_kv_cache_capacity": 4096,
        "max_lora_rank": 0,
        "max_tree_size": 60,
        "min_image_tokens": None,
        "max_image_tokens": None,
        "max_image_tokens_per_image": None,
    }


def test_build_limit_defaults_are_the_same_in_the_schema_and_the_cli():
    """The workflow takes defaults from the schema, edgellm-build-engine from BuildLimits."""
    assert model_settings({"models": {"m": {"source": "x"}}}, "m").build == BuildLimits()


def test_model_overrides_defaults_which_override_the_schema():
    config = {
        "defaults": {"sm_targets": [110], "build": {"max_batch_size": 8}},
        "models": {"m": {"source": "x", "build": {"max_input_len": 256}}, "n": {"source": "y", "sm_targets": [89]}},
    }
    validate_config(config)
    m, n = model_settings(config, "m"), model_settings(config, "n")
    assert m.sm_targets == (110,) and m.build.max_batch_size == 8 and m.build.max_input_len == 256
    assert n.sm_targets == (89,) and n.build.max_batch_size == 8 and n.build.max_input_len == 1024


def test_unknown_model_names_the_known_ones():
    with pytest.raises(ConfigError, match=r"unknown model 'z'.*defines a, b"):
        model_settings({"models": {"a": {"source": "x"}, "b": {"source": "y"}}}, "z")


def test_config_yaml_in_the_workdir_is_found(tmp_path):
    (tmp_path / "config.yaml").write_text("models:\n  m:\n    source: x\n")
    assert load_workflow_config({}, tmp_path)["models"] == {"m": {"source": "x"}}


def test_planning_does_not_import_torch():
    """Every dry-run imports the planning code; torch alone would add over a second to each."""
    import subprocess
    import sys

    code = "import sys, edgellm_steps.workflow.planning; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_quantize_flags_follow_the_config():
    from edgellm_steps.workflow.planning import Planner

    config = {"models": {"m": {"source": "x", "quantization": {"calib_size": 64, "batch_size": 4}}}}
    validate_config(config)
    flags = Planner(config).inputs.quantize_options("m", "int4_awq-lmfp8-kvfp8")
    assert flags == ("--precision int4_awq-lmfp8-kvfp8 --calib_size 64 --calib_max_tokens 512 --calib_batch_size 4")


def test_an_engine_reads_only_the_limits_of_its_kind():
    """Image-token limits are not params of LLM engine jobs, so changing them reruns no LLM engine."""
    from edgellm_steps.workflow.planning import Planner

    config = {"models": {"m": {"source": "x", "build": {"max_image_tokens": 2048, "max_tree_size": 8}}}}
    validate_config(config)
    planner = Planner(config)
    assert planner.facts.model("m").build_limits() == {
        "max_batch_size": 4,
        "max_input_len": 1024,
        "max_kv_cache_capacity": 4096,
        "max_lora_rank": 0,
        "max_tree_size": 8,
    }
    # The image-token limits given; the others are the vision tower's defaults, filled in when planned.
    build = planner.facts.model("m").settings.build
    assert (build.min_image_tokens, build.max_image_tokens, build.max_image_tokens_per_image) == (None, 2048, None)


def test_job_threads_have_defaults_and_are_validated():
    settings = model_settings({"models": {"m": {"source": "x"}}}, "m")
    assert settings.quantization.threads == 8 and settings.verify.threads == 4
    config = {"defaults": {"verify": {"threads": 2}}, "models": {"m": {"source": "x", "quantization": {"threads": 1}}}}
    validate_config(config)
    settings = model_settings(config, "m")
    assert settings.quantization.threads == 1 and settings.verify.threads == 2
    for bad in ({"quantization": {"threads": 0}}, {"verify": {"threads": "many"}}, {"verify": {"cores": 2}}):
        with pytest.raises(ConfigError, match=r"invalid config at models\.m\.(quantization|verify)"):
            validate_config({"models": {"m": {"source": "x", **bad}}})


def test_accuracy_report_compares_fp16_with_the_configured_precisions(checkpoint_factory, tmp_path):
    """Its inputs are fp16's and each configured precision's LLM export; its recorded flags name them and what is
    measured; held-out text that is the calibration text, or a model it cannot compare, is refused in one line."""
    import shutil

    from edgellm_steps.workflow.planning import Planner

    shutil.copytree(checkpoint_factory("qwen2"), tmp_path / "ckpt")
    (tmp_path / "held.txt").write_text("some held-out prose, long enough to be text\n")

    def planner(**settings) -> Planner:
        config = {"models": {"m": {"source": str(tmp_path / "ckpt"), **settings}}}
        validate_config(config)
        return Planner(config, state_dir=tmp_path / "state")

    inputs = planner(precisions=["fp8", "fp16-kvfp8"]).inputs
    assert inputs.accuracy_report("m") == {
        f"export_{p}": f"onnx/m_{p}/llm/manifest.json" for p in ("fp16", "fp8", "fp16-kvfp8")
    }
    assert inputs.accuracy_options("m") == (
        "--export fp16=onnx/m_fp16/llm --export fp8=onnx/m_fp8/llm --export fp16-kvfp8=onnx/m_fp16-kvfp8/llm"
        " --model m --samples 8 --tokens 128"
    )
    held = str(tmp_path / "held.txt")
    given = planner(accuracy={"dataset": held, "samples": 2}).inputs
    assert given.accuracy_report("m") == {"export_fp16": "onnx/m_fp16/llm/manifest.json", "dataset": [held]}
    assert given.accuracy_options("m").endswith(f"--samples 2 --tokens 128 --dataset {held}")
    refused = {
        "is its quantization.dataset": {"accuracy": {"dataset": held}, "quantization": {"dataset": held}},
        "does not exist": {"accuracy": {"dataset": str(tmp_path / "missing.txt")}},
        "has a reduced vocabulary": {"reduced_vocab": {"size": 64}},
        "unknown weight precision": {"precisions": ["fp16", "fp7"]},
    }
    for expected, settings in refused.items():
        with pytest.raises(EdgeLLMError, match=expected):
            planner(**settings).inputs.accuracy_report("m")


def test_quantization_exclude_is_resolved_at_planning_and_recorded_by_quantize(checkpoint_factory, tmp_path):
    """Patterns are checked against the source's decoder Linears; the quantize flags (recorded) carry them, the
    shared calibration's do not; a pattern matching nothing, or every Linear, is refused in one line."""
    import shutil

    from edgellm_steps.workflow.planning import Planner

    shutil.copytree(checkpoint_factory("qwen2"), tmp_path / "ckpt")

    def inputs(*patterns: str):
        config = {"models": {"m": {"source": str(tmp_path / "ckpt"), "quantization": {"exclude": list(patterns)}}}}
        validate_config(config)
        return Planner(config, state_dir=tmp_path / "state").inputs

    planned = inputs("*.down_proj", "model.layers.0.*")
    assert planned.facts.model("m").excluded_linears == [
        *(f"model.layers.0.{n}" for n in ("mlp.down_proj", "mlp.gate_proj", "mlp.up_proj")),
        *(f"model.layers.0.self_attn.{x}_proj" for x in "koqv"),
        "model.layers.1.mlp.down_proj",
    ]
    assert planned.quantize_options("m", "fp8").endswith(
        "--statistics_dir calibration/m --exclude '*.down_proj' --exclude 'model.layers.0.*'"
    )
    assert "--exclude" not in planned.calibrate_options("m")
    for patterns, expected in (
        (("*.mlp.gate",), "pattern '*.mlp.gate' matches no decoder Linear of model 'm'"),
        (("lm_head",), "pattern 'lm_head' matches no decoder Linear"),
        (("model.layers.*",), "matches every decoder Linear"),
    ):
        with pytest.raises(ConfigError, match=re.escape(expected)):
            inputs(*patterns).quantize_options("m", "fp8")
