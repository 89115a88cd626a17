"""Qwen3-VL's language model export against transformers: deepstack inputs and the interleaved MRoPE table.

The graph is fed as the runtime feeds it (contract 3.6): image rows spliced into the embeddings,
each deepstack input holding the tower's rows at the image tokens and zeros elsewhere, and the
rope table built by :mod:`edgellm_steps.verify.mrope` from (T, H, W) positions. The reference is
transformers' ``Qwen3VLForConditionalGeneration`` language model given the same embeddings,
``visual_pos_masks``, ``deepstack_visual_embeds`` and position ids. As in test_vlm_end_to_end, a
"sharp" checkpoint (decoder weights with std 0.2) makes attention sensitive to positions, so the
negative controls (no deepstack rows, the consecutive-section table) must miss the tolerance.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto

from edgellm_steps.export import llm_io
from edgellm_steps.export.export_llm import export_llm
from edgellm_steps.verify.mrope import export_mrope_table, mrope_positions, mrope_table
from edgellm_steps.verify.parity import TOLERANCES, compare_logits
from edgellm_steps.verify.reference import LLMRunner

log = logging.getLogger(__name__)

#: One 8 x 8-patch image (16 merged tokens) in a short prompt: vision_start at index 3.
GRID = (1, 8, 8)
PROMPT_TEXT = 3
TAIL_TEXT = 4
TABLE_ATOL = 2e-5
TOL = TOLERANCES["fp16"]


@pytest.fixture(scope="module")
def sharp(checkpoint_factory, tmp_path_factory):
    """(checkpoint, export, HF model) of a Qwen3-VL whose attention depends on positions."""
    import transformers

    checkpoint = checkpoint_factory("qwen3_vl", initializer_range=0.2)
    out = tmp_path_factory.mktemp("qwen3-vl-llm") / "llm"
    export_llm(checkpoint, out)
    model = transformers.Qwen3VLForConditionalGeneration.from_pretrained(str(checkpoint), dtype=torch.float32)
    return checkpoint, out, model.eval()


def _prompt(config: dict) -> tuple[list[int], np.ndarray]:
    """Token ids (text, vision_start, image pads, vision_end, text) and the image-pad mask."""
    pads = GRID[0] * GRID[1] * GRID[2] // 4
    start, end, pad = (config[k] for k in ("vision_start_token_id", "vision_end_token_id", "image_token_id"))
    # Plain words, above the special tokens the tokenizer numbers first.
    ids = [105, 106, 107][:PROMPT_TEXT] + [start] + [pad] * pads + [end] + [108, 109, 110, 111][:TAIL_TEXT]
    return ids, np.asarray(ids) == pad


def test_the_graph_declares_the_deepstack_inputs_last(sharp):
    _, out, _ = sharp
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    names = [i.name for i in graph.input]
    assert names[-4:] == [llm_io.KVCACHE_START_INDEX, "deepstack_embeds_0", "deepstack_embeds_1", "deepstack_embeds_2"]
    embeds = next(i for i in graph.input if i.name == llm_io.INPUTS_EMBEDS).type.tensor_type
    for name in names[-3:]:
        deep = next(i for i in graph.input if i.name == name).type.tensor_type
        assert deep.elem_type == TensorProto.FLOAT16 and deep.shape == embeds.shape
    config = json.loads((out / "config.json").read_text())
    assert config["rope_scaling"] == {
        "type": "default",
        "rope_type": "default",
        "mrope_section": [2, 3, 3],
        "mrope_interleaved": True,
    }
    assert config["rope_theta"] == 5000000.0 and config["model"] == "qwen3_vl"
    assert {"image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"} <= set(config)


def test_positions_and_interleaved_table_equal_transformers(sharp):
    """The image prompt's (T, H, W) positions are get_rope_index's; the table is the HF rotary module's."""
    checkpoint, out, model = sharp
    config = json.loads((checkpoint / "config.json").read_text())
    ids, image = _prompt(config)
    positions = mrope_positions(ids, [GRID], vision_start_id=config["vision_start_token_id"], merge_size=2)
    token_types = torch.from_numpy(image.astype(np.int64))[None]
    expected, _ = model.model.get_rope_index(torch.tensor([ids]), token_types, image_grid_thw=torch.tensor([GRID]))
    np.testing.assert_array_equal(positions, expected[:, 0].numpy())
    rotary = model.model.language_model.rotary_emb
    with torch.no_grad():
        cos, sin = rotary(torch.zeros(1), torch.from_numpy(positions)[:, None])
    half = cos.shape[-1] // 2
    hf_table = torch.cat([cos[..., :half], sin[..., :half]], dim=-1).numpy()
    table = export_mrope_table(out, positions)
    np.testing.assert_allclose(table, hf_table, rtol=0, atol=TABLE_ATOL)
    # Negative control: Qwen2-VL's consecutive sections give another table.
    consecutive = mrope_table(positions, rope_theta=5e6, mrope_section=[2, 3, 3])[None]
    assert np.abs(consecutive - hf_table).max() > 100 * TABLE_ATOL


def test_the_published_geometry_interleaves_as_transformers(tmp_path):
    """Rotary dim 128 with sections [24, 20, 20] (every published size): slot j by j % 3 below 60, then T."""
    from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLTextConfig
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextRotaryEmbedding

    rope = {"rope_type": "default", "rope_theta": 5e6, "mrope_section": [24, 20, 20], "mrope_interleaved": True}
    config = Qwen3VLTextConfig(hidden_size=4096, num_attention_heads=32, head_dim=128, rope_parameters=rope)
    positions = np.stack([np.arange(50), 7 + np.arange(50) % 5, 11 + np.arange(50) // 5]).astype(np.int64)
    with torch.no_grad():
        cos, sin = Qwen3VLTextRotaryEmbedding(config)(torch.zeros(1), torch.from_numpy(positions)[:, None])
    hf = torch.cat([cos[..., :64], sin[..., :64]], dim=-1)[0].numpy()
    ours = mrope_table(positions, rope_theta=5e6, mrope_section=[24, 20, 20], interleaved=True)
    np.testing.assert_allclose(ours, hf, rtol=0, atol=1e-4)
    assert np.abs(mrope_table(positions, rope_theta=5e6, mrope_section=[24, 20, 20]) - hf).max() > 0.1


def _reference_logits(model, embeds, image, deepstack, positions) -> np.ndarray:
    """transformers' language model on the same embeddings, deepstack rows and positions: logits [S, V]."""
    text = model.model.language_model
    with torch.no_grad():
        hidden = text(
            inputs_embeds=torch.from_numpy(embeds)[None],
            position_ids=torch.from_numpy(positions)[:, None],
            visual_pos_masks=torch.from_numpy(image)[None],
            deepstack_visual_embeds=[torch.from_numpy(rows) for rows in deepstack],
        ).last_hidden_state
        return model.lm_head(hidden)[0].numpy()


def test_deepstack_graph_equals_transformers(sharp):
    """Prefill with image rows and deepstack rows at the image tokens: every position's logits, and the controls."""
    checkpoint, out, model = sharp
    config = json.loads((checkpoint / "config.json").read_text())
    ids, image = _prompt(config)
    rng = np.random.default_rng(0)
    hidden = config["text_config"]["hidden_size"]
    embedding = model.model.language_model.embed_tokens.weight.detach().numpy()
    embeds = embedding[ids].copy()
    embeds[image] = rng.standard_normal((image.sum(), hidden)).astype(np.float32)
    deepstack = [rng.standard_normal((image.sum(), hidden)).astype(np.float32) for _ in range(3)]
    positions = mrope_positions(ids, [GRID], vision_start_id=config["vision_start_token_id"], merge_size=2)
    expected = _reference_logits(model, embeds, image, deepstack, positions)

    def graph(rows, table) -> np.ndarray:
        scattered = []
        for k in range(3):
            full = np.zeros((1, len(ids), hidden), np.float32)
            full[0, image] = rows[k]
            scattered.append(full)
        runner = LLMRunner(out, table, batch=1, capacity=64)
        return runner.step([ids], all_logits=True, embeds=embeds[None], deepstack=scattered)[0]

    capacity_positions = mrope_positions(
        ids, [GRID], vision_start_id=config["vision_start_token_id"], merge_size=2, length=64
    )
    table = export_mrope_table(out, capacity_positions)
    result = compare_logits(graph(deepstack, table), expected)
    assert result.passed(TOL), result
    assert (graph(deepstack, table).argmax(-1) == expected.argmax(-1)).all()
    # Negative controls: the deepstack rows dropped; Qwen2-VL's consecutive rope sections.
    zeros = compare_logits(graph([np.zeros_like(r) for r in deepstack], table), expected)
    assert not zeros.passed(TOL), zeros
    consecutive = mrope_table(capacity_positions, rope_theta=5e6, mrope_section=[2, 3, 3])[None]
    wrong_rope = compare_logits(graph(deepstack, consecutive), expected)
    assert not wrong_rope.passed(TOL), wrong_rope
    log.info("deepstack parity %s; controls: zeros %s, consecutive rope %s", result, zeros, wrong_rope)


def test_the_engine_gives_deepstack_the_embeddings_profiles_and_counts_them(sharp, tmp_path):
    """Engine side without TensorRT: profiles of the deepstack inputs are inputs_embeds'; the config counts them."""
    from edgellm_steps.engine import layout
    from edgellm_steps.engine.limits import BuildLimits
    from edgellm_steps.engine.profiles import llm_profiles

    _, out, _ = sharp
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False)
    for profile in llm_profiles(graph, BuildLimits()):
        for k in range(3):
            assert profile[f"deepstack_embeds_{k}"] == profile[llm_io.INPUTS_EMBEDS]
    engine = layout.write_engine_dir(tmp_path / "vl_fp16.engine", out, b"llm engine", sm=110, limits=BuildLimits())
    assert json.loads((engine / "config.json").read_text())["builder_config"]["num_deepstack_features"] == 3


def test_an_eagle_base_of_a_deepstack_model_is_refused(sharp, tmp_path):
    from edgellm_steps.errors import SourceError

    checkpoint, _, _ = sharp
    with pytest.raises(SourceError, match="EAGLE3 speculative decoding on a deepstack language model"):
        export_llm(checkpoint, tmp_path / "eagle_base", eagle_base=True)
    assert not (tmp_path / "eagle_base").exists()


def test_the_runtime_rope_limit_is_named_for_other_geometries_only(checkpoint_factory):
    from dataclasses import replace

    from edgellm_steps.models.families import runtime_rope_warning
    from edgellm_steps.quant.checkpoint_record import open_checkpoint

    tiny = open_checkpoint(checkpoint_factory("qwen3_vl")).dims
    assert "supports rotary dim 128 with sections [24, 20, 20] only" in runtime_rope_warning(tiny)
    published = replace(tiny, head_dim=128, rope_scaling={**tiny.rope_scaling, "mrope_section": [24, 20, 20]})
    assert runtime_rope_warning(published) is None
    # Consecutive sections (Qwen2-VL, Qwen2.5-VL) run on the runtime's other kernel: nothing to say.
    assert runtime_rope_warning(open_checkpoint(checkpoint_factory("qwen2_5_vl")).dims) is None


def test_a_transformers4_checkpoint_exports_the_same(checkpoint_factory, exported, tmp_path):
    """Qwen3-VL as transformers 4.57 saves it: rope_theta / rope_scaling inside text_config, torch_dtype."""
    import shutil

    source, standard = exported("qwen3_vl")
    checkpoint = Path(shutil.copytree(source, tmp_path / "ckpt"))
    config = json.loads((checkpoint / "config.json").read_text())
    rope = config["text_config"].pop("rope_parameters")
    config["text_config"]["rope_theta"] = rope.pop("rope_theta")
    config["text_config"]["rope_scaling"] = rope
    config["torch_dtype"] = config.pop("dtype")
    config["transformers_version"] = "4.57.1"
    (checkpoint / "config.json").write_text(json.dumps(config, indent=2))
    export_llm(checkpoint, tmp_path / "out")
    ours = json.loads((tmp_path / "out/config.json").read_text())
    assert ours["rope_scaling"] == json.loads((standard / "config.json").read_text())["rope_scaling"]
    assert ours["rope_scaling"]["mrope_interleaved"] is True and ours["rope_theta"] == 5000000.0
    # The same graph and weights as the standard layout's export, whose parity test_export_llm proves.
    for name in ("model.onnx", "onnx_model.data", "embedding.safetensors"):
        assert (tmp_path / "out" / name).read_bytes() == (standard / name).read_bytes(), name


def test_the_runtime_splice_equals_transformers(sharp):
    """Image ids as vocab_size + k across the batch, the spliced embeddings and the deepstack feeds are what
    transformers' placeholder mask, masked_scatter and deepstack addition make of the same rows."""
    from edgellm_steps.verify.vlm_splice import (
        decode_deepstack_feeds,
        deepstack_feeds,
        runtime_token_ids,
        spliced_embeddings,
    )

    checkpoint, _, model = sharp
    config = json.loads((checkpoint / "config.json").read_text())
    pad, vocab, hidden = config["image_token_id"], config["text_config"]["vocab_size"], 64
    first = [105, config["vision_start_token_id"], *[pad] * 16, config["vision_end_token_id"], 106]
    second = [107, config["vision_start_token_id"], *[pad] * 4, config["vision_end_token_id"], 108, 109, 110]
    rng = np.random.default_rng(1)
    rows = rng.standard_normal((20, hidden)).astype(np.float32)
    deep_rows = [rng.standard_normal((20, hidden)).astype(np.float32) for _ in range(3)]
    runtime = runtime_token_ids([first, second], pad, vocab)
    assert runtime[0, 2] == vocab and runtime[1, 2] == vocab + 16 and runtime[1, 5] == vocab + 19
    ours = spliced_embeddings(runtime, model.model.language_model.embed_tokens.weight.detach().numpy(), rows)
    input_ids = torch.zeros(runtime.shape, dtype=torch.long)
    input_ids[0, : len(first)], input_ids[1, : len(second)] = torch.tensor(first), torch.tensor(second)
    with torch.no_grad():
        embeds = model.model.get_input_embeddings()(input_ids)
        mask, _ = model.model.get_placeholder_mask(input_ids, embeds, image_features=torch.from_numpy(rows))
        expected = embeds.masked_scatter(mask, torch.from_numpy(rows)).numpy()
    np.testing.assert_array_equal(ours, expected)
    states = rng.standard_normal((*runtime.shape, hidden)).astype(np.float32)
    text = model.model.language_model
    for k, feed in enumerate(deepstack_feeds(runtime, vocab, deep_rows)):
        with torch.no_grad():
            hf = text._deepstack_process(torch.from_numpy(states.copy()), mask[..., 0], torch.from_numpy(deep_rows[k]))
        np.testing.assert_allclose(states + feed, hf.numpy(), rtol=0, atol=1e-6)
    assert all(not f.any() and f.shape == (2, 1, hidden) for f in decode_deepstack_feeds(2, 1, hidden, 3))
    # Negative control: counting image tokens per sequence (k restarting at 0) splices the wrong rows.
    per_sequence = runtime.copy()
    per_sequence[1][per_sequence[1] >= vocab] -= 16
    wrong = spliced_embeddings(per_sequence, model.model.language_model.embed_tokens.weight.detach().numpy(), rows)
    assert not np.allclose(wrong, expected)
