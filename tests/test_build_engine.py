"""build-engine's checks: the export matches its manifest, the host has what the build needs.

Each problem is one line, before any work, and no engine appears.

TensorRT and GPUs are absent from CI; where a check needs them present, their
probes (the module lookup, nvidia-smi's answer) are replaced, and the real
check code runs.
"""

from __future__ import annotations

import importlib.util
import json
import shutil

import pytest

from edgellm_steps.artifacts.manifest import ManifestMismatchError
from edgellm_steps.engine import build_engine as step
from edgellm_steps.engine import host, layout
from edgellm_steps.engine.limits import BuildLimits, image_token_limits
from edgellm_steps.errors import EdgeLLMError, MissingDependencyError
from edgellm_steps.export.export_llm import export_llm
from edgellm_steps.export.kinds import EXPORT_KINDS

#: Small LLM limits; the image-token limits a Qwen-VL tower's defaults (the contract's), as planning fills them in.
LIMITS = image_token_limits(
    BuildLimits(max_batch_size=1, max_input_len=16, max_kv_cache_capacity=32), tiled=False, where=""
)


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
    assert host.visible_gpu_sm() is None  # this host has no nvidia-smi answer
    with pytest.raises(MissingDependencyError, match="no NVIDIA GPU is visible"):
        step.build_engine(export_dir, tmp_path / "e.engine", sm=87, limits=LIMITS)
    assert not (tmp_path / "e.engine").exists()


def test_on_a_gpu_of_another_sm(export_dir, tmp_path, tensorrt_present, monkeypatch):
    monkeypatch.setattr(host, "visible_gpu_sm", lambda: 90)
    with pytest.raises(EdgeLLMError, match="the visible GPU is sm90 but the target is sm87"):
        step.build_engine(export_dir, tmp_path / "e.engine", sm=87, limits=LIMITS)


def test_without_the_plugin_library(export_dir, tmp_path, tensorrt_present, monkeypatch):
    monkeypatch.setattr(host, "visible_gpu_sm", lambda: 87)
    monkeypatch.delenv(host.PLUGIN_ENV, raising=False)
    with pytest.raises(MissingDependencyError, match="EDGELLM_PLUGIN_PATH"):
        step.build_engine(export_dir, tmp_path / "e.engine", sm=87, limits=LIMITS)


def test_an_unfinished_export_is_refused(tmp_path):
    with pytest.raises(EdgeLLMError, match="not a finished export-llm output"):
        step.build_engine(tmp_path, tmp_path / "e.engine", sm=87, limits=LIMITS)


@pytest.fixture
def edited_export(export_dir, tmp_path):
    copy = tmp_path / "llm"
    shutil.copytree(export_dir, copy)
    return copy


def test_an_export_changed_after_its_manifest_is_refused(edited_export, tmp_path):
    """Same size, one flipped byte deep in the weights: only the digest can tell."""
    data = edited_export / "onnx_model.data"
    with open(data, "r+b") as handle:
        handle.seek(data.stat().st_size // 2)
        byte = handle.read(1)
        handle.seek(-1, 1)
        handle.write(bytes([byte[0] ^ 0x10]))
    with pytest.raises(ManifestMismatchError, match=r"onnx_model\.data changed after export-llm wrote it"):
        step.build_engine(edited_export, tmp_path / "e.engine", sm=87, limits=LIMITS)
    assert not (tmp_path / "e.engine").exists()


@pytest.mark.parametrize("edit", ["extra", "missing", "manifest of another step"])
def test_an_export_that_is_not_what_its_manifest_lists_is_refused(edited_export, tmp_path, edit):
    if edit == "extra":
        (edited_export / "onnx_model.data.part2").write_bytes(b"left by another run")
        expected = "holds onnx_model.data.part2, which its manifest does not list"
    elif edit == "missing":
        (edited_export / "embedding.safetensors").unlink()
        expected = "embedding.safetensors is listed in its manifest but missing"
    else:
        manifest = edited_export / "manifest.json"
        manifest.write_text(manifest.read_text().replace('"export-llm"', '"quantize-llm"'))
        expected = "is not a manifest written by export-llm"
    with pytest.raises(ManifestMismatchError, match=expected):
        step.build_engine(edited_export, tmp_path / "e.engine", sm=87, limits=LIMITS)


def test_builder_config_holds_the_limits_of_the_engine_kind():
    llm = layout.builder_config_of(EXPORT_KINDS["draft"], LIMITS)
    assert llm == {
        "max_batch_size": 1,
        "max_input_len": 16,
        "max_kv_cache_capacity": 32,
        "max_lora_rank": 0,
        "max_tree_size": 60,
        "eagle_base": False,
        "eagle_draft": True,
    }
    visual = layout.builder_config_of(EXPORT_KINDS["visual"], LIMITS)
    assert visual == {"min_image_tokens": 4, "max_image_tokens": 1024, "max_image_tokens_per_image": 512}


def test_an_export_visual_output_makes_a_vision_engine(checkpoint_factory, tmp_path):
    from edgellm_steps.export.export_visual import export_visual

    visual = export_visual(checkpoint_factory("qwen2_5_vl"), tmp_path / "visual").parent
    assert step.check_export(visual).profile == "visual"
    with pytest.raises(MissingDependencyError, match="TensorRT is not installed"):
        step.build_engine(visual, tmp_path / "v.engine", sm=87, limits=LIMITS)


def test_a_vlm_engine_directory_holds_the_vision_engine(checkpoint_factory, tmp_path):
    """The layout the runtime loads: the LLM engine directory, and its vision engine directory in visual/.

    The engine bytes stand in for TensorRT's output (not available here); everything around them is real.
    """
    from edgellm_steps.artifacts.manifest import check_step_output
    from edgellm_steps.export.export_visual import export_visual

    checkpoint = checkpoint_factory("qwen2_5_vl")
    visual_onnx = export_visual(checkpoint, tmp_path / "onnx/visual").parent
    llm_onnx = tmp_path / "onnx/llm"
    export_llm(checkpoint, llm_onnx)
    visual_engine = layout.write_engine_dir(
        tmp_path / "engines/sm87/visual/vl.engine", visual_onnx, b"vision engine", sm=87, limits=LIMITS
    )
    # A vision engine for another SM, or a directory that is not a finished build, is refused.
    with pytest.raises(EdgeLLMError, match="not a vision engine for sm110"):
        layout.check_component_engine(visual_engine, 110, EXPORT_KINDS["visual"])
    engine = layout.write_engine_dir(
        tmp_path / "engines/sm87/vl_fp16.engine",
        llm_onnx,
        b"llm engine",
        sm=87,
        limits=LIMITS,
        visual_engine_dir=layout.check_component_engine(visual_engine, 87, EXPORT_KINDS["visual"]),
    )
    top = {p.name for p in engine.iterdir()}
    assert {"llm.engine", "config.json", "tokenizer.json", "embedding.safetensors", "visual", "manifest.json"} <= top
    assert (engine / "visual/visual.engine").read_bytes() == b"vision engine"
    visual_config = json.loads((engine / "visual/config.json").read_text())
    # What the runtime's vision runner reads: model_type, token ids, builder limits, the preprocessor beside it.
    assert visual_config["model_type"] == "qwen2_5_vl" and "image_token_id" in visual_config
    assert visual_config["builder_config"] == {
        "min_image_tokens": 4,
        "max_image_tokens": 1024,
        "max_image_tokens_per_image": 512,
    }
    assert (engine / "visual/preprocessor_config.json").is_file()
    assert json.loads((engine / "config.json").read_text())["builder_config"]["max_batch_size"] == 1
    # The engine directory's manifest covers visual/ too: a changed vision engine file is caught.
    manifest = check_step_output(engine, "build-engine")
    assert "visual/visual.engine" in manifest["files"]
    (engine / "visual/visual.engine").unlink()
    (engine / "visual/visual.engine").write_bytes(b"vision engine, rebuilt elsewhere")
    with pytest.raises(ManifestMismatchError, match=r"visual/visual\.engine changed after build-engine"):
        check_step_output(engine, "build-engine")


def test_an_eagle_engine_directory_holds_base_and_draft_as_the_runtime_names_them(checkpoint_factory, tmp_path):
    """eagle_base.engine + base_config.json and eagle_draft.engine + draft_config.json + d2t.safetensors, one directory.

    The engine bytes stand in for TensorRT's output (not available here); everything around them is real.
    """
    from edgellm_steps.export.export_draft import export_draft
    from edgellm_steps.models.demo import make_eagle3_draft

    base = checkpoint_factory("llama")
    export_llm(base, tmp_path / "onnx/eagle_base", eagle_base=True)
    export_draft(make_eagle3_draft(tmp_path / "draft", base), base, tmp_path / "onnx/draft")
    draft_engine = layout.write_engine_dir(
        tmp_path / "engines/draft.engine", tmp_path / "onnx/draft", b"draft", sm=110, limits=LIMITS
    )
    assert {p.name for p in draft_engine.iterdir()} == {
        "eagle_draft.engine",
        "draft_config.json",
        "d2t.safetensors",
        "manifest.json",
    }
    engine = layout.write_engine_dir(
        tmp_path / "engines/eagle.engine",
        tmp_path / "onnx/eagle_base",
        b"base",
        sm=110,
        limits=LIMITS,
        draft_engine_dir=layout.check_component_engine(draft_engine, 110, EXPORT_KINDS["draft"]),
    )
    files = {p.name for p in engine.iterdir()}
    assert {"eagle_base.engine", "base_config.json", "eagle_draft.engine", "draft_config.json"} <= files
    assert {"d2t.safetensors", "tokenizer.json", "embedding.safetensors", "manifest.json"} <= files
    assert "llm.engine" not in files and "config.json" not in files
    base_config = json.loads((engine / "base_config.json").read_text())["builder_config"]
    draft_config = json.loads((engine / "draft_config.json").read_text())["builder_config"]
    assert base_config["eagle_base"] and not base_config["eagle_draft"]
    assert draft_config["eagle_draft"] and not draft_config["eagle_base"]
    with pytest.raises(EdgeLLMError, match="not an EAGLE draft engine for sm87"):
        layout.check_component_engine(draft_engine, 87, EXPORT_KINDS["draft"])
