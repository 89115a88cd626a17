"""Phi-4-multimodal (contract 7.4) against transformers: the vision graph per crop, the separators' side file.

The language model's text parity is test_export_llm's (case ``phi4mm``). The vision reference is transformers'
``SiglipVisionModel`` holding the checkpoint's tower (see ``models/vision_tower.py`` for why not the native
``Phi4MultimodalVisionModel``), followed by the native ``Phi4MultimodalImageEmbedding``'s own pooling and
projection modules, as its ``get_img_features`` and ``forward`` apply them. End to end, the runtime's layout of
the crops (``verify/phi4mm_layout.py``) against the native model. The vision LoRA merge is not built yet: planning
refuses a Phi-4-multimodal engine (tested here).
"""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from safetensors.numpy import load_file

from edgellm_steps.export import visual_io as io
from edgellm_steps.export.export_visual import export_visual
from edgellm_steps.export.visual_graph_phi4mm import GN_PROJ_FILE, Phi4mmVisualGraph
from edgellm_steps.graph.onnx_builder import write_graph
from edgellm_steps.models.tile_geometry import PHI4MM_VISION_DEFAULTS
from edgellm_steps.models.vision_geometry import open_vision_tower
from edgellm_steps.models.vision_tower import load_tile_features
from edgellm_steps.verify.parity import TOLERANCES, compare_logits
from edgellm_steps.verify.verify_visual import verify_visual

from .support import copy_checkpoint, planned_jobs, run_snakemake, write_config

#: Feature rows have no argmax to agree on.
TOL = replace(TOLERANCES["fp16"], greedy=False)


@pytest.fixture(scope="module")
def phi4mm(checkpoint_factory, tmp_path_factory):
    checkpoint = checkpoint_factory("phi4mm")
    visual = tmp_path_factory.mktemp("phi4mm") / "visual"
    export_visual(checkpoint, visual)
    tower = open_vision_tower(checkpoint)
    session = ort.InferenceSession(str(visual / "model.onnx"), providers=["CPUExecutionProvider"])
    return checkpoint, visual, tower, load_tile_features(tower), session


def crops(count: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((count, 3, 64, 64)).astype(np.float32)


def run(session: ort.InferenceSession, tiles: np.ndarray) -> np.ndarray:
    return session.run([io.OUTPUT], {io.INPUT: tiles.astype(np.float16)})[0].astype(np.float32)


def test_planning_reads_transformers_defaults():
    from transformers import Phi4MultimodalVisionConfig

    vision = Phi4MultimodalVisionConfig()
    assert {key: getattr(vision, key) for key in PHI4MM_VISION_DEFAULTS} == PHI4MM_VISION_DEFAULTS


def test_the_vision_graph_equals_transformers_per_crop(phi4mm, tmp_path):
    """One crop and five (a 2 x 2 HD image and its global view) in one batch; controls: crops in another order,
    the features of the last block instead of ``feature_layer`` (-2)."""
    checkpoint, _, tower, features, session = phi4mm
    for count in (1, 5):
        tiles = crops(count, seed=count)
        with torch.no_grad():
            expected = features(torch.from_numpy(tiles)).numpy()
        assert expected.shape == (count * 256, json.loads((checkpoint / "config.json").read_text())["hidden_size"])
        result = compare_logits(run(session, tiles), expected)
        assert result.passed(TOL), result
    assert not compare_logits(run(session, tiles[::-1].copy()), expected).passed(TOL)

    class LastBlock(Phi4mmVisualGraph):
        def build(self):
            self.dims = type(self.dims)(**{**vars(self.dims), "feature_blocks": self.dims.depth})
            return super().build()

    args = (tower.store, tower.spec, tower.dims, tower.prefix)
    write_graph(tmp_path, lambda builder: LastBlock(builder, *args, projector=tower.projector).build())
    wrong = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    assert not compare_logits(run(wrong, tiles), expected).passed(TOL)


def test_the_separators_side_file_is_their_projection_by_transformers(phi4mm):
    """``glb_GN`` / ``sub_GN`` equal the native module's projection of its own separator parameters (float16);
    the unprojected vectors, the control, do not."""
    import transformers

    checkpoint, visual, _, _, _ = phi4mm
    model = transformers.Phi4MultimodalForCausalLM.from_pretrained(str(checkpoint), dtype=torch.float32)
    embed = model.model.embed_tokens_extend.image_embed
    side = load_file(str(visual / GN_PROJ_FILE))
    assert sorted(side) == ["glb_GN", "sub_GN"]
    for key, parameter in (("glb_GN", embed.global_img_feature_extensor), ("sub_GN", embed.sub_img_feature_extensor)):
        with torch.no_grad():
            vector = parameter.reshape(-1)
            expected = embed.img_projection_down(torch.nn.functional.gelu(embed.img_projection_up(vector))).numpy()
        got = side[key].astype(np.float32)
        assert side[key].dtype == np.float16 and got.shape == (model.config.hidden_size,)
        np.testing.assert_allclose(got, expected, rtol=2e-3, atol=2e-3)
        assert not np.allclose(np.resize(vector.detach().numpy(), got.shape), expected, atol=2e-3)


def test_the_fp8_tower_verifies(phi4mm, tmp_path):
    """fp8 (the tower's Linears; the patch embedding, the unused pooling head and the projection float) against
    ModelOpt's fake-quantized tower; the fp16 graph's parity is the test above."""
    checkpoint, _, _, _, _ = phi4mm
    export_visual(checkpoint, tmp_path / "fp8", quantization="fp8")
    assert verify_visual(tmp_path / "fp8", checkpoint)["passed"]
    graph = onnx.load(str(tmp_path / "fp8/model.onnx"), load_external_data=False).graph
    fp8 = {node.name.rsplit("/", 2)[0] for node in graph.node if node.op_type == "QuantizeLinear"}
    assert any("encoder/layers/1/mlp/fc2" in name for name in fp8), sorted(fp8)[:4]
    assert not [name for name in fp8 if "projection" in name or "patch_embedding" in name or "/head/" in name]


#: An image of 1 x 2 crops: the global view first, then the crops, as the native module orders them.
ROWS, COLS = 1, 2
NEW_TOKENS = 3


def test_a_prompt_with_an_image_end_to_end_equals_transformers(checkpoint_factory, tmp_path):
    """Vision graph over the global view and the crops -> the runtime's layout with the side file's separators ->
    splice at vocab_size + k -> language graph, prefill and decode, against ``Phi4MultimodalForCausalLM`` (its
    vision attention made bidirectional, which alone makes its tower SigLIP's); controls: zeros for the
    separators, the global view taken as the last block."""
    import transformers

    from edgellm_steps.export.export_llm import export_llm
    from edgellm_steps.verify.parity import hf_rope_table
    from edgellm_steps.verify.phi4mm_layout import image_rows, image_tokens
    from edgellm_steps.verify.reference import LLMRunner
    from edgellm_steps.verify.vlm_splice import runtime_token_ids, spliced_embeddings

    checkpoint = checkpoint_factory("phi4mm", initializer_range=0.2)
    export_llm(checkpoint, tmp_path / "llm")
    export_visual(checkpoint, tmp_path / "visual")
    config = json.loads((checkpoint / "config.json").read_text())
    image_id, vocab = config["vision_config"]["image_token_id"], config["vocab_size"]
    model = transformers.Phi4MultimodalForCausalLM.from_pretrained(str(checkpoint), dtype=torch.float32).eval()
    for module in model.model.embed_tokens_extend.image_embed.img_processor.modules():
        if hasattr(module, "is_causal"):
            module.is_causal = False
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(checkpoint))
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the picture."}]}],
        tokenize=False,
        add_generation_prompt=True,
    )
    ids: list[int] = []
    for token in tokenizer(text, add_special_tokens=False)["input_ids"]:
        ids += [image_id] * image_tokens(ROWS, COLS) if token == image_id else [token]
    blocks = crops(1 + ROWS * COLS, seed=7)
    pixels = {
        "image_pixel_values": torch.from_numpy(blocks)[None],
        "image_sizes": torch.tensor([[64 * ROWS, 64 * COLS]]),
        "image_attention_mask": torch.ones(1, len(blocks), 32, 32, dtype=torch.bool),
    }
    tokens = list(ids)
    while True:
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([tokens]), **pixels, use_cache=False).logits[0]
        if len(tokens) == len(ids) + NEW_TOKENS:
            break
        tokens.append(int(logits[-1].argmax()))
    expected, new_tokens = logits[len(ids) - 1 :].numpy(), tokens[len(ids) :]
    side = load_file(str(tmp_path / "visual" / GN_PROJ_FILE))
    session = ort.InferenceSession(str(tmp_path / "visual/model.onnx"), providers=["CPUExecutionProvider"])
    rows = run(session, blocks)
    embedding = load_file(str(tmp_path / "llm/embedding.safetensors"))["embedding"]
    runtime_ids = runtime_token_ids([ids], image_id, vocab)

    def ours(image: np.ndarray) -> np.ndarray:
        embeds = spliced_embeddings(runtime_ids, embedding, image).astype(np.float16)
        capacity = len(ids) + NEW_TOKENS
        runner = LLMRunner(tmp_path / "llm", hf_rope_table(model, capacity), batch=1, capacity=capacity)
        out = [runner.step([ids], embeds=embeds)[0, -1]]
        out += [runner.step([[token]])[0, -1] for token in new_tokens]
        return np.stack(out)

    glb, sub = side["glb_GN"].astype(np.float32), side["sub_GN"].astype(np.float32)
    got = ours(image_rows(rows, ROWS, COLS, glb, sub))
    result = compare_logits(got, expected)
    assert result.passed(TOLERANCES["fp16"]) and [int(r.argmax()) for r in got[:-1]] == new_tokens, result
    no_separators = image_rows(rows, ROWS, COLS, np.zeros_like(glb), np.zeros_like(sub))
    assert not compare_logits(ours(no_separators), expected).passed(TOLERANCES["fp16"])
    global_last = np.concatenate([rows[256:], rows[:256]])
    assert not compare_logits(ours(image_rows(global_last, ROWS, COLS, glb, sub)), expected).passed(TOLERANCES["fp16"])


#: The language model's GEMMs as the published vision LoRA targets them (not the audio encoder's o_proj).
VISION_LORA_TARGETS = r"model\.layers\.\d+\.(self_attn\.(qkv_proj|o_proj)|mlp\.(gate_up_proj|down_proj))"


def test_only_the_variant_with_the_vision_lora_merged_gets_an_engine(checkpoint_factory, tmp_path):
    """The base model's engine is refused at planning (its language model alone would answer images); the
    variant merging ``vision-lora/`` merges, exports and verifies through Snakemake, as the vision encoder does,
    and its engine directory (with the vision engine) is planned. Served LoRA stays refused on a VLM."""
    from edgellm_steps.models.demo import make_lora_adapter

    copy_checkpoint(checkpoint_factory("phi4mm"), tmp_path / "ckpt")
    make_lora_adapter(tmp_path / "ckpt/vision-lora", tmp_path / "ckpt", VISION_LORA_TARGETS, r=4)
    merged = "models:\n  vlm:\n    source: ckpt\n    lora: {vision: {source: ckpt/vision-lora, merge: true}}\n"
    write_config(tmp_path, merged)
    refused = run_snakemake(tmp_path, "-n", "engines/sm110/vlm_fp16.engine", check=False)
    assert refused.returncode != 0 and "Traceback" not in refused.output
    assert "model 'vlm': a phi4mm engine answers image prompts only with the checkpoint's vision-lora/ merged" in (
        refused.output
    )
    plan = run_snakemake(tmp_path, "-n", "engines/sm110/vlm+vision_fp16.engine")
    assert planned_jobs(plan.output) == {
        "merge_lora": 1,
        "export_llm": 1,
        "export_visual": 1,
        "build_visual_engine": 1,
        "build_engine": 1,
    }
    reports = ("reports/vlm+vision_fp16/verify.json", "reports/vlm/visual/verify.json")
    run_snakemake(tmp_path, *reports)
    for report in reports:
        assert json.loads((tmp_path / report).read_text())["passed"], report
    assert (tmp_path / "onnx/vlm/visual" / GN_PROJ_FILE).is_file()
    write_config(tmp_path, merged.replace("merge: true", "merge: false"))
    served = run_snakemake(tmp_path, "-n", "lora/vlm/vision/processed_adapter_model.safetensors", check=False)
    assert "LoRA served on a vision-language model (phi4mm) is not supported" in served.output


def test_the_remote_code_layout_is_refused_at_planning_with_the_conversion_to_run(checkpoint_factory, tmp_path):
    copy_checkpoint(checkpoint_factory("phi4mm"), tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt/config.json").read_text())
    config["architectures"] = ["Phi4MMForCausalLM"]
    (tmp_path / "ckpt/config.json").write_text(json.dumps(config))
    write_config(tmp_path, "models:\n  vlm:\n    source: ckpt\n")
    refused = run_snakemake(tmp_path, "-n", "onnx/vlm_fp16/llm/model.onnx", check=False)
    assert refused.returncode != 0 and "Traceback" not in refused.output
    [line] = [line for line in refused.output.splitlines() if line.startswith("Error")]
    assert "unsupported architecture Phi4MMForCausalLM: this is Phi-4-multimodal's remote-code layout" in line
    assert "convert_phi4_multimodal_weights_to_hf.py" in line
