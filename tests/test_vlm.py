"""export-llm on vision-language models (Qwen2-VL, Qwen2.5-VL): the language model, with text-only parity.

The runtime consumes a VLM's language model as the same LLM graph (contract section 3); the
image embeddings are spliced into ``inputs_embeds`` outside it. With text-only input the three
MRoPE position components are equal, so the rope table the runtime fills is the ordinary RoPE
of each position and the HF VLM run on text-only ``input_ids`` is the reference.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from edgellm_steps.artifacts.checkpoint import decoder_dims
from edgellm_steps.artifacts.tokenizer_files import PROCESSOR_FILES
from edgellm_steps.errors import ParityError, SourceError
from edgellm_steps.export.export_llm import export_llm
from edgellm_steps.models.demo import QWEN_VL_TEMPLATE, QWEN_VL_TOKEN_IDS, TINY_MROPE
from edgellm_steps.models.families import FAMILIES, family_for
from edgellm_steps.verify.parity import hf_rope_table
from edgellm_steps.verify.reference import LLMRunner
from edgellm_steps.verify.verify_onnx import verify_onnx

VLM_CASES = {"qwen2_vl": "Qwen2VLForConditionalGeneration", "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration"}


def tensor_names(checkpoint) -> list[str]:
    with safe_open(str(checkpoint / "model.safetensors"), "pt") as f:
        return list(f.keys())


def test_vlm_families_are_declared():
    vlm = {spec.family: spec for spec in FAMILIES if spec.vision_language}
    # Qwen3-VL's language model has its own tests (test_qwen3_vl_llm.py), InternVL's and Phi-4-multimodal's
    # test_internvl.py and test_phi4mm.py.
    assert set(vlm) == {*VLM_CASES, "qwen3_vl", "internvl", "phi4mm"}
    assert all(not vlm[tiled].mrope and vlm[tiled].vision.tiled for tiled in ("internvl", "phi4mm"))
    vlm = {family: spec for family, spec in vlm.items() if not spec.vision.tiled}
    for family, arch in {**VLM_CASES, "qwen3_vl": "Qwen3VLForConditionalGeneration"}.items():
        assert vlm[family].architectures == (arch,) and vlm[family].mrope
        assert vlm[family].hf_auto_class == "AutoModelForImageTextToText"


@pytest.mark.parametrize("case", sorted(VLM_CASES))
def test_tiny_vlm_checkpoint(checkpoint_factory, case):
    """transformers 5 layout: text_config / vision_config; weights as it saves them (model.layers.*, visual.*)."""
    import transformers

    checkpoint = checkpoint_factory(case)
    config = json.loads((checkpoint / "config.json").read_text())
    assert config["architectures"] == [VLM_CASES[case]]
    assert config["text_config"]["rope_parameters"]["mrope_section"] == TINY_MROPE["mrope_section"]
    vocab = json.loads((checkpoint / "tokenizer.json").read_text())["added_tokens"]
    special = {token["content"]: token["id"] for token in vocab}
    for key, token in QWEN_VL_TOKEN_IDS.items():
        assert config[key] == special[token], key
    names = tensor_names(checkpoint)
    assert {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"} <= set(names)
    assert any(n.startswith("visual.blocks.1.") for n in names) and any(n.startswith("visual.merger.") for n in names)
    allowed = ("model.embed_tokens.", "model.layers.", "model.norm.", "visual.", "lm_head.")
    assert all(n.startswith(allowed) for n in names)
    vision = config["vision_config"]
    processor = json.loads((checkpoint / "preprocessor_config.json").read_text())
    assert processor["image_processor_type"] == "Qwen2VLImageProcessor"
    assert (processor["patch_size"], processor["merge_size"], processor["temporal_patch_size"]) == (
        vision["patch_size"],
        vision["spatial_merge_size"],
        vision["temporal_patch_size"],
    )
    # The tiny vision tower runs: 4 x 4 patches of one frame merge into 4 tokens of the decoder's width.
    model = transformers.AutoModelForImageTextToText.from_pretrained(str(checkpoint), dtype=torch.float32)
    pixels = torch.randn(16, 3 * vision["temporal_patch_size"] * vision["patch_size"] ** 2)
    with torch.no_grad():
        features = model.model.get_image_features(pixels, torch.tensor([[1, 4, 4]])).pooler_output
    assert [tuple(f.shape) for f in features] == [(4, config["text_config"]["hidden_size"])]


def with_all_processor_files(checkpoint, destination):
    """A copy of a tiny VLM that also has the processor files the fixture does not write."""
    shutil.copytree(checkpoint, destination)
    extra = {
        "video_preprocessor_config.json": {"video_processor_type": "Qwen2VLVideoProcessor", "fps": 2.0},
        "processor_config.json": {"processor_class": "Qwen2_5_VLProcessor"},
        "chat_template.json": {"chat_template": QWEN_VL_TEMPLATE},
    }
    for name, data in extra.items():
        (destination / name).write_text(json.dumps(data, indent=2) + "\n")
    assert all((destination / name).is_file() for name in PROCESSOR_FILES)
    return destination


@pytest.mark.parametrize("case", sorted(VLM_CASES))
def test_vlm_export_carries_processor_files_and_content_types(exported, case):
    checkpoint, out = exported(case)
    assert (out / "preprocessor_config.json").read_bytes() == (checkpoint / "preprocessor_config.json").read_bytes()
    for name in set(PROCESSOR_FILES) - {"preprocessor_config.json"}:
        assert not (out / name).exists(), f"{name}: the fixture has none, so the export has none"
    template = json.loads((out / "processed_chat_template.json").read_text())
    assert template["content_types"] == {
        "image": {"format": "<|vision_start|><|image_pad|><|vision_end|>"},
        "video": {"format": "<|vision_start|><|video_pad|><|vision_end|>"},
    }


@pytest.mark.parametrize("case", sorted(VLM_CASES))
def test_vlm_graph_is_the_llm_graph_without_the_vision_tower(exported, case):
    checkpoint, out = exported(case)
    text = json.loads((checkpoint / "config.json").read_text())["text_config"]
    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    inputs = {v.name: v.type.tensor_type for v in model.graph.input}
    rope = inputs["rope_rotary_cos_sin"]
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    assert rope.elem_type == TensorProto.FLOAT
    # Batch dim B: the runtime fills one MRoPE table per sequence (contract 3.3).
    assert [d.dim_param or d.dim_value for d in rope.shape.dim] == [
        "rope_batch_size",
        "max_position_embeddings",
        head_dim,
    ]
    assert next(iter(inputs)) == "inputs_embeds" and "pixel_values" not in inputs
    initializers = {t.name for t in model.graph.initializer}
    assert not any("visual" in name for name in initializers), "the vision tower is not part of the LLM graph"
    decoder = {n for n in tensor_names(checkpoint) if n.startswith("model.layers.")}
    assert decoder <= initializers
    assert sum(n.op_type == "AttentionPlugin" for n in model.graph.node) == text["num_hidden_layers"]


@pytest.mark.parametrize("case", sorted(VLM_CASES))
def test_vlm_runtime_config(exported, case):
    checkpoint, out = exported(case)
    hf = json.loads((checkpoint / "config.json").read_text())
    config = json.loads((out / "config.json").read_text())
    assert config["model"] == case and config["model_type"] == "llm"
    # The spelling the 0.5 runtime parses as MRoPE (contract section 4).
    assert config["rope_scaling"] == {"type": "default", "rope_type": "default", "mrope_section": [2, 3, 3]}
    assert config["rope_theta"] == TINY_MROPE["rope_theta"]
    token_keys = {k for k in hf if k.endswith(("_token_id", "_token_ids"))}
    assert token_keys >= set(QWEN_VL_TOKEN_IDS)
    assert {k: config[k] for k in token_keys} == {k: hf[k] for k in token_keys}
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size"):
        assert config[key] == hf["text_config"][key], key


def test_llm_configs_gain_no_token_ids(checkpoint_factory, tmp_path):
    export_llm(checkpoint_factory("qwen2"), tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert not [k for k in config if k.endswith(("_token_id", "_token_ids"))]


def test_vlm_rope_table_is_plain_rope_for_text(checkpoint_factory):
    """hf_rope_table of a VLM (its language model's rotary module) is cos/sin of p * theta^(-2i/D)."""
    import transformers

    model = transformers.AutoModelForImageTextToText.from_pretrained(str(checkpoint_factory("qwen2_5_vl")))
    table = hf_rope_table(model, 12)
    head_dim = 16
    inv_freq = TINY_MROPE["rope_theta"] ** (-np.arange(0, head_dim, 2) / head_dim)
    angles = np.arange(12)[:, None] * inv_freq[None]
    assert table.shape == (1, 12, head_dim)
    np.testing.assert_allclose(table[0], np.concatenate([np.cos(angles), np.sin(angles)], -1), atol=1e-5)


@pytest.mark.parametrize("case", sorted(VLM_CASES))
def test_vlm_parity_with_transformers(exported, case, tmp_path):
    """fp16 export vs the HF VLM on text-only input_ids: 3 scenarios, each within 1% of max |logit|."""
    checkpoint, out = exported(case)
    summary = verify_onnx(out, checkpoint, report=tmp_path / "report.json")
    assert summary["passed"]
    for name, result in summary["cases"].items():
        assert result["relative_error"] <= 1e-2 and result["min_cosine"] >= 0.999 and result["greedy_match"], name


def test_per_sequence_rope_tables(exported, checkpoint_factory):
    """The runtime feeds an MRoPE graph one table per sequence ([B, L, rot]); equal text tables, equal logits."""
    import transformers

    checkpoint, out = exported("qwen2_vl")
    model = transformers.AutoModelForImageTextToText.from_pretrained(str(checkpoint), dtype=torch.float32)
    table = hf_rope_table(model, 12)
    prompts = [[10, 20, 30, 40, 50], [60, 70, 80]]
    shared = LLMRunner(out, table, batch=2, capacity=12).step(prompts)
    batched = LLMRunner(out, np.repeat(table, 2, axis=0), batch=2, capacity=12).step(prompts)
    np.testing.assert_array_equal(shared, batched)
    # ... and a wrong table for sequence 1 changes only sequence 1 (the plugin reads row b for sequence b).
    skewed = np.repeat(table, 2, axis=0)
    skewed[1] = np.roll(skewed[1], 1, axis=0)
    moved = LLMRunner(out, skewed, batch=2, capacity=12).step(prompts)
    np.testing.assert_array_equal(moved[0], shared[0])
    assert np.abs(moved[1] - shared[1]).max() > 1e-3


def as_language_model_layout(checkpoint, destination):
    """The checkpoint with transformers' in-memory names (model.language_model.*, model.visual.*)."""
    shutil.copytree(checkpoint, destination)
    tensors = load_file(str(destination / "model.safetensors"))
    renamed = {}
    for name, value in tensors.items():
        if name.startswith("visual."):
            name = "model." + name
        elif name.startswith("model."):
            name = "model.language_model." + name.removeprefix("model.")
        renamed[name] = value
    save_file(renamed, str(destination / "model.safetensors"), metadata={"format": "pt"})
    return destination


def as_transformers4_vlm_config(path):
    """A Qwen-VL config.json as transformers 4.x wrote it: decoder facts at the top level, rope_scaling 'mrope'."""
    config = json.loads(path.read_text())
    text = config.pop("text_config")
    rope = text.pop("rope_parameters")
    for key in ("model_type", "layer_types", "dtype"):
        text.pop(key, None)
    config.update(text)
    config["rope_theta"] = rope["rope_theta"]
    config["rope_scaling"] = {"type": "mrope", "mrope_section": rope["mrope_section"]}
    config["torch_dtype"] = config.pop("dtype")
    config["transformers_version"] = "4.49.0"
    path.write_text(json.dumps(config, indent=2))


def in_layout(source, destination, layout):
    """``source`` copied to ``destination`` in another layout HF VLM checkpoints come in."""
    if layout == "language_model_names":
        checkpoint = as_language_model_layout(source, destination)
        names = tensor_names(checkpoint)
        assert any(n.startswith("model.language_model.layers.") for n in names)
        assert any(n.startswith("model.visual.blocks.") for n in names)
        return checkpoint
    checkpoint = shutil.copytree(source, destination)
    as_transformers4_vlm_config(checkpoint / "config.json")
    return checkpoint


@pytest.mark.parametrize("layout", ["language_model_names", "transformers4_config"])
def test_other_vlm_layouts_export_with_parity(checkpoint_factory, tmp_path, layout):
    source = checkpoint_factory("qwen2_5_vl")
    checkpoint = in_layout(source, tmp_path / "ckpt", layout)
    export_llm(checkpoint, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["rope_scaling"] == {"type": "default", "rope_type": "default", "mrope_section": [2, 3, 3]}
    summary = verify_onnx(tmp_path / "out", checkpoint)
    assert summary["passed"], summary
    # The same weights, however they are named or configured: the standard layout's export, byte for byte.
    export_llm(source, tmp_path / "standard")
    for name in ("onnx_model.data", "embedding.safetensors"):
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "standard" / name).read_bytes(), name


def test_mrope_section_must_fit_the_rotary_dim(checkpoint_factory, tmp_path):
    checkpoint = shutil.copytree(checkpoint_factory("qwen2_vl"), tmp_path / "ckpt")
    config = json.loads((checkpoint / "config.json").read_text())
    config["text_config"]["rope_parameters"]["mrope_section"] = [2, 2, 2]
    (checkpoint / "config.json").write_text(json.dumps(config))
    with pytest.raises(SourceError, match=r"mrope_section summing to half the rotary dim 16, got \[2, 2, 2\]"):
        export_llm(checkpoint, tmp_path / "out")


def test_decoder_dims_of_vlm_configs():
    text = {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "vocab_size": 100,
        "max_position_embeddings": 64,
        "rope_parameters": dict(TINY_MROPE),
    }
    cfg = {"architectures": ["Qwen2VLForConditionalGeneration"], "text_config": text}
    dims = decoder_dims(cfg)
    assert dims.rope_scaling == {"type": "default", "rope_type": "default", "mrope_section": [2, 3, 3]}
    assert not dims.tie_word_embeddings and dims.num_kv_heads == 4
    # Saves before transformers 5 kept tie_word_embeddings inside text_config (Qwen2-VL-2B).
    assert decoder_dims({**cfg, "text_config": {**text, "tie_word_embeddings": True}}).tie_word_embeddings
    assert decoder_dims({**cfg, "tie_word_embeddings": True}).tie_word_embeddings
    assert family_for(cfg).family == "qwen2_vl"


def test_quantize_llm_quantizes_only_the_decoder(checkpoint_factory, tmp_path):
    """int8_sq on a VLM: the decoder's GEMMs get quantizers, the vision tower none; the export matches
    ModelOpt's fake-quantized VLM (measured 0.8% of max |logit|, cosine 0.99996) within the int8_sq bound."""
    from edgellm_steps.quant.quantize_llm import quantize_llm

    source = with_all_processor_files(checkpoint_factory("qwen2_5_vl"), tmp_path / "src")
    quantized = quantize_llm(source, tmp_path / "q", precision="int8_sq", calib_size=8, calib_max_tokens=32)
    names = tensor_names(quantized)
    quantizers = [n for n in names if "_quantizer." in n]
    assert any(n.startswith("model.layers.0.mlp.down_proj.weight_quantizer") for n in quantizers)
    assert not [n for n in quantizers if "visual" in n]
    assert any(n.startswith("visual.blocks.") for n in names), "the vision tower is kept, in float"
    state = torch.load(quantized / "modelopt_state.pth", weights_only=True)
    assert "visual" in json.dumps(state, default=str)  # the exclusion is recorded in the state's config
    export_llm(quantized, tmp_path / "out")
    for name in PROCESSOR_FILES:  # byte for byte through quantize and export
        assert (quantized / name).read_bytes() == (source / name).read_bytes(), name
        assert (tmp_path / "out" / name).read_bytes() == (source / name).read_bytes(), name
    summary = verify_onnx(tmp_path / "out", quantized)
    assert summary["precision"] == "int8_sq" and summary["passed"], summary
    for result in summary["cases"].values():
        assert result["relative_error"] <= 2e-2 and result["min_cosine"] >= 0.9995
    # The quantization is real: against the float VLM the same export misses (measured 16% of max |logit|).
    with pytest.raises(ParityError, match="does not match"):
        verify_onnx(tmp_path / "out", checkpoint_factory("qwen2_5_vl"))


@pytest.mark.parametrize("layout", ["language_model_names", "transformers4_config"])
def test_other_vlm_layouts_export_the_same_vision_encoder(checkpoint_factory, tmp_path, layout):
    from edgellm_steps.export.export_visual import export_visual

    source = checkpoint_factory("qwen2_5_vl")
    checkpoint = in_layout(source, tmp_path / "ckpt", layout)
    export_visual(checkpoint, tmp_path / "out")
    export_visual(source, tmp_path / "standard")
    # The same tower weights, however named or configured; the graph differs only in initializer names.
    standard = json.loads((tmp_path / "standard" / "manifest.json").read_text())["files"]
    got = json.loads((tmp_path / "out" / "manifest.json").read_text())["files"]
    assert got["onnx_model.data"] == standard["onnx_model.data"]
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    text = json.loads((source / "config.json").read_text())["text_config"]
    # What the runtime's vision runner reads at the top level, in either config layout.
    assert config["vocab_size"] == text["vocab_size"]
    assert config["rope_theta"] == text["rope_parameters"]["rope_theta"]
