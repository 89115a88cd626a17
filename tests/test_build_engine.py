"""build-engine's host checks: each missing piece is one line, before any work, and no engine appears.

TensorRT and GPUs are absent from CI; where a check needs them present, their
probes (the module lookup, nvidia-smi's answer) are replaced, and the real
check code runs.
"""

from __future__ import annotations

import importlib.util

import pytest

from edgellm_steps import build_engine as step
from edgellm_steps.config import BuildLimits
from edgellm_steps.errors import EdgeLLMError, MissingDependencyError
from edgellm_steps.export_llm import export_llm

LIMITS = BuildLimits(max_batch_size=1, max_input_len=16, max_kv_cache_capacity=32)


@pytest.fixture(scope="module")
def export_dir(checkpoint_factory, tmp_path_factory):
    out = tmp_path_factory.mktemp("engine") / "llm"
    export_llm(checkpoint_factory("qwen2"), out)
    return out


@pytest.fixture
def tensorrt_present(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: object() if name == "tensorrt" else real(name, *a)
    )


def test_without_tensorrt(export_dir, tmp_path):
    with pytest.raises(MissingDependencyError, match="TensorRT is not installed"):
        step.build_engine(export_dir, tmp_path / "e.engine", sm=87, limits=LIMITS)
    assert not (tmp_path / "e.engine").exists()


def test_without_a_gpu(export_dir, tmp_path, tensorrt_present):
    assert step.visible_gpu_sm() is None  # this host has no nvidia-smi answer
    with pytest.raises(MissingDependencyError, match="no NVIDIA GPU is visible"):
        step.build_engine(export_dir, tmp_path / "e.engine", sm=87, limits=LIMITS)
    assert not (tmp_path / "e.engine").exists()


def test_on_a_gpu_of_another_sm(export_dir, tmp_path, tensorrt_present, monkeypatch):
    monkeypatch.setattr(step, "visible_gpu_sm", lambda: 90)
    with pytest.raises(EdgeLLMError, match="the visible GPU is sm90 but the target is sm87"):
        step.build_engine(export_dir, tmp_path / "e.engine", sm=87, limits=LIMITS)


def test_without_the_plugin_library(export_dir, tmp_path, tensorrt_present, monkeypatch):
    monkeypatch.setattr(step, "visible_gpu_sm", lambda: 87)
    monkeypatch.delenv(step.PLUGIN_ENV, raising=False)
    with pytest.raises(MissingDependencyError, match="EDGELLM_PLUGIN_PATH"):
        step.build_engine(export_dir, tmp_path / "e.engine", sm=87, limits=LIMITS)


def test_an_unfinished_export_is_refused(tmp_path):
    with pytest.raises(EdgeLLMError, match="not a finished export"):
        step.build_engine(tmp_path, tmp_path / "e.engine", sm=87, limits=LIMITS)


def test_builder_config_holds_the_limits_of_the_engine_kind():
    llm = step.builder_config_of("llm", LIMITS, {"model_type": "eagle3_draft"})
    assert llm == {
        "max_batch_size": 1,
        "max_input_len": 16,
        "max_kv_cache_capacity": 32,
        "max_lora_rank": 0,
        "max_tree_size": 60,
        "eagle_base": False,
        "eagle_draft": True,
    }
    visual = step.builder_config_of("visual", LIMITS, {"model_type": "qwen2_5_vl"})
    assert visual == {"min_image_tokens": 4, "max_image_tokens": 1024, "max_image_tokens_per_image": 512}
