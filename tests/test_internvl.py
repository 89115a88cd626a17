"""InternVL3 (contract 7.3) against transformers: the vision graph, the language model, both end to end.

References are transformers' own: ``InternVLModel.get_image_features`` for the vision graph (tower,
CLS drop, pixel shuffle, projector) and ``InternVLForConditionalGeneration`` for the logits of a prompt
with images. The tiny checkpoint's decoder is "sharp" (weights drawn with std 0.2, as in the Qwen-VL
end-to-end tests) and its tower's layer scales are drawn at random, so that a wrong splice, tile order,
feature layer or shuffle moves the outputs far outside the fp16 tolerance; each of those is a negative
control here that must fail.
"""

from __future__ import annotations

import copy
import json
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from safetensors.numpy import load_file

from edgellm_steps.artifacts.checkpoint import TensorStore
from edgellm_steps.engine.limits import BuildLimits
from edgellm_steps.engine.profiles import engine_profiles
from edgellm_steps.errors import ConfigError, SourceError
from edgellm_steps.export import visual_io as io
from edgellm_steps.export.export_llm import export_llm
from edgellm_steps.export.export_visual import export_visual
from edgellm_steps.export.visual_graph_internvl import InternVLVisualGraph
from edgellm_steps.graph.onnx_builder import write_graph
from edgellm_steps.models.tile_geometry import TOP_DEFAULTS, VISION_DEFAULTS
from edgellm_steps.models.vision_geometry import open_vision_tower
from edgellm_steps.models.vision_tower import load_tile_features
from edgellm_steps.quant.calibration_images import calibration_images
from edgellm_steps.quant.checkpoint_record import open_checkpoint
from edgellm_steps.quant.visual_calibration import calibrated_tower
from edgellm_steps.verify.internvl_tiles import expand_prompt, vision_input
from edgellm_steps.verify.parity import TOLERANCES, ParityResult, compare_logits, hf_rope_table, judge
from edgellm_steps.verify.reference import LLMRunner
from edgellm_steps.verify.verify_visual import _tolerance as fp8_tolerance
from edgellm_steps.verify.vlm_splice import runtime_token_ids, spliced_embeddings

TOL = TOLERANCES["fp16"]
#: Feature rows have no argmax to agree on.
ROWS_TOL = replace(TOL, greedy=False)
#: A decoder whose attention depends on its inputs (see the module docstring).
SHARP = {"initializer_range": 0.2}
NEW_TOKENS = 4


def fails(result: ParityResult, tolerance=ROWS_TOL) -> bool:
    return not result.passed(tolerance)


@dataclass
class InternVL:
    checkpoint: Path
    llm_dir: Path
    visual_dir: Path
    model: torch.nn.Module
    session: ort.InferenceSession

    @property
    def config(self) -> dict:
        return json.loads((self.checkpoint / "config.json").read_text())

    def features(self, tiles: np.ndarray) -> np.ndarray:
        """transformers' image features of ``tiles`` [N, 3, S, S]: [N * 256, H]."""
        with torch.no_grad():
            out = self.model.model.get_image_features(pixel_values=torch.from_numpy(tiles)).pooler_output
        return out.reshape(-1, out.shape[-1]).numpy()

    def graph(self, tiles: np.ndarray, session: ort.InferenceSession | None = None) -> np.ndarray:
        return (session or self.session).run([io.OUTPUT], {io.INPUT: tiles.astype(np.float16)})[0].astype(np.float32)


def _session(directory: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(directory / "model.onnx"), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def internvl(checkpoint_factory, tmp_path_factory) -> InternVL:
    import transformers

    checkpoint = checkpoint_factory("internvl", **SHARP)
    out = tmp_path_factory.mktemp("internvl")
    export_llm(checkpoint, out / "llm")
    export_visual(checkpoint, out / "visual")
    model = transformers.InternVLForConditionalGeneration.from_pretrained(str(checkpoint), dtype=torch.float32)
    return InternVL(checkpoint, out / "llm", out / "visual", model.eval(), _session(out / "visual"))


def tiles_of(internvl: InternVL, count: int, seed: int = 0) -> np.ndarray:
    side = internvl.config["vision_config"]["image_size"][0]
    return np.random.default_rng(seed).standard_normal((count, 3, side, side)).astype(np.float32)


def test_planning_reads_transformers_defaults():
    """Planning reads InternVL's JSON without transformers: its table of defaults must be transformers' own."""
    from transformers import InternVLConfig, InternVLVisionConfig

    vision, top = InternVLVisionConfig(), InternVLConfig()
    for key, value in VISION_DEFAULTS.items():
        got = getattr(vision, key)
        assert (list(got) if isinstance(got, tuple | list) else got) == (
            [value, value] if key in ("image_size", "patch_size") else value
        ), key
    assert {key: getattr(top, key) for key in TOP_DEFAULTS} == TOP_DEFAULTS


def test_vision_graph_equals_transformers_image_features(internvl):
    """One tile and seven tiles (two images' tiles and thumbnails) in one batch; controls: tiles in another
    order, a shuffle that does not join 2 x 2 neighbours, features one layer early."""
    for count in (1, 7):
        tiles = tiles_of(internvl, count, seed=count)
        expected = internvl.features(tiles)
        assert expected.shape == (count * 256, internvl.config["text_config"]["hidden_size"])
        result = compare_logits(internvl.graph(tiles), expected)
        assert result.passed(ROWS_TOL), result
    # Rows follow the tiles: the same tiles in another order give the other rows.
    assert fails(compare_logits(internvl.graph(tiles[::-1].copy()), expected))


class _NoShuffle(InternVLVisualGraph):
    """A control: the CLS row dropped, then 4 consecutive patches of a row joined, not 2 x 2 neighbours."""

    def pixel_shuffle(self, x: str) -> str:
        g, d = self.g, self.dims
        x = g.op("Reshape", [x, self.const([-1, self.rows, d.width], "tile_rows")], "/shuffle/Reshape")
        x = g.op("Slice", [x, *self.slice_args(1, self.rows, axis=1)], "/shuffle/Slice")
        return g.op("Reshape", [x, self.const([-1, d.shuffled_width], "shuffled_rows")], "/shuffle/Reshape_1")


class _EarlyFeatures(InternVLVisualGraph):
    """A control: the features of the layer before the configured one."""

    def layer(self, i: int, x: str) -> str:
        return x if i == self.dims.feature_blocks - 1 else super().layer(i, x)


@pytest.mark.parametrize("control", [_NoShuffle, _EarlyFeatures])
def test_a_wrong_shuffle_or_feature_layer_is_caught(internvl, tmp_path, control):
    tower = open_vision_tower(internvl.checkpoint)
    args = (tower.store, tower.spec, tower.dims, tower.prefix)
    write_graph(tmp_path, lambda builder: control(builder, *args, projector=tower.projector).build())
    tiles = tiles_of(internvl, 2)
    assert fails(compare_logits(internvl.graph(tiles, _session(tmp_path)), internvl.features(tiles)))


def test_rms_norm_qk_norm_and_an_earlier_feature_layer(checkpoint_factory, tmp_path):
    """InternViT-6B's switches (RMSNorm, q/k norms), features of layer -2 (hidden_states[-2], one block early),
    and the final LayerNorm a config without mean pooling applies to the last layer's."""
    import transformers

    source = checkpoint_factory("internvl", vision={"norm_type": "rms_norm", "use_qk_norm": True})
    for layer, pooling in ((-2, True), (-1, False)):
        checkpoint = tmp_path / f"layer{layer}"
        shutil.copytree(source, checkpoint)
        config = json.loads((checkpoint / "config.json").read_text())
        config["vision_feature_layer"] = layer
        config["vision_config"]["use_mean_pooling"] = pooling
        if not pooling:  # the tower's final LayerNorm: a tensor the source lacks
            store = TensorStore(source)
            from safetensors.torch import save_file

            tensors = {name: store.get(name) for name in store.names()}
            width = config["vision_config"]["hidden_size"]
            torch.manual_seed(1)
            tensors["vision_tower.layernorm.weight"] = (1 + torch.randn(width) * 0.3).half()
            tensors["vision_tower.layernorm.bias"] = (torch.randn(width) * 0.3).half()
            save_file(tensors, str(checkpoint / "model.safetensors"), metadata={"format": "pt"})
        (checkpoint / "config.json").write_text(json.dumps(config))
        export_visual(checkpoint, tmp_path / f"visual{layer}")
        model = transformers.InternVLForConditionalGeneration.from_pretrained(str(checkpoint), dtype=torch.float32)
        tiles = np.random.default_rng(0).standard_normal((2, 3, 64, 64)).astype(np.float32)
        with torch.no_grad():
            expected = model.model.get_image_features(pixel_values=torch.from_numpy(tiles)).pooler_output
        got = _session(tmp_path / f"visual{layer}").run(None, {io.INPUT: tiles.astype(np.float16)})[0]
        result = compare_logits(got.astype(np.float32), expected.reshape(-1, expected.shape[-1]).numpy())
        assert result.passed(ROWS_TOL), (layer, pooling, result)


def test_verify_s_float16_floor_runs_a_float16_copy_of_the_reference(internvl):
    """The floor verify bounds its check by is the reference itself in float16: a deep copy, cast, computes with
    its own (float16) modules and leaves the original in float32."""
    features = load_tile_features(open_vision_tower(internvl.checkpoint))
    half = copy.deepcopy(features).to(torch.float16)
    tiles = torch.from_numpy(tiles_of(internvl, 1))
    with torch.no_grad():
        full, low = features(tiles), half(tiles.half())
    assert full.dtype == torch.float32 and low.dtype == torch.float16 and not torch.equal(full, low.float())


def test_the_fp8_tower_is_modelopts_and_its_bound_catches_an_fp16_graph(internvl, tmp_path):
    """The fp8 graph within verify's fp8 bound of ModelOpt's fake-quantized tower (projector and patch embedding
    float; verify-onnx runs on a tiled fp8 tower in test_phi4mm, on this fp16 one in test_internvl_workflow); the
    fp16 graph held to the same bound fails."""
    fp8_dir = tmp_path / "visual_fp8"
    export_visual(internvl.checkpoint, fp8_dir, quantization="fp8")
    graph = onnx.load(str(fp8_dir / "model.onnx"), load_external_data=False).graph
    fp8 = {node.name.rsplit("/", 2)[0] for node in graph.node if node.op_type == "QuantizeLinear"}
    assert any("encoder/layer/1/mlp/fc2" in name for name in fp8), sorted(fp8)[:4]
    assert not [name for name in fp8 if "projector" in name or "patch_embeddings" in name]
    # The control: the fp16 export held to the fp8 report's bound (ModelOpt's tower, its own float16 floor).
    reference = calibrated_tower(open_vision_tower(internvl.checkpoint))
    half = copy.deepcopy(reference).to(torch.float16)
    tiles = tiles_of(internvl, 2, seed=5)
    with torch.no_grad():
        expected = reference(torch.from_numpy(tiles)).numpy()
        floor = compare_logits(half(torch.from_numpy(tiles).half()).float().numpy(), expected)
    bound = judge(fp8_tolerance("fp8"), floor)
    assert compare_logits(internvl.graph(tiles, _session(fp8_dir)), expected).passed(bound)
    assert not compare_logits(internvl.graph(tiles), expected).passed(bound)


def prompt_ids(internvl: InternVL, blocks: list[int]) -> list[int]:
    """The chat template's ids, each image placeholder expanded as the runtime expands it (``<img>``, 256
    placeholders per block, ``</img>``; :mod:`~edgellm_steps.verify.internvl_tiles`)."""
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(str(internvl.checkpoint))
    content: list[dict] = [{"type": "text", "text": "Compare"}]
    for _ in blocks:
        content += [{"type": "image"}, {"type": "text", "text": " and"}]
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
    )
    start, end = (tokenizer.convert_tokens_to_ids(token) for token in ("<img>", "</img>"))
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    context = internvl.config["image_token_id"]
    return expand_prompt(ids, blocks, image_token_id=context, img_start_id=start, img_end_id=end)


def runtime_tiles(internvl: InternVL) -> tuple[np.ndarray, list[int]]:
    """Two generated images tiled as the runtime tiles them: a wide one (2 tiles and its thumbnail) and a small
    one (1 tile and, the runtime's rule, a thumbnail too)."""
    side = internvl.config["vision_config"]["image_size"][0]
    wide, small = calibration_images(2, 8, seed=3)
    images = [np.resize(wide, (side, 2 * side, 3)), small[: side // 2, : side // 2]]
    tiles, blocks = vision_input(images, tile_size=side, thumbnail="always")
    assert blocks == [3, 2]
    return tiles.astype(np.float32), blocks


def reference(internvl: InternVL, ids: list[int], tiles: np.ndarray) -> tuple[list[int], np.ndarray]:
    """transformers' greedy tokens and logits [NEW_TOKENS + 1, V] (full forwards, no cache)."""
    tokens = list(ids)
    while True:
        with torch.no_grad():
            logits = internvl.model(
                input_ids=torch.tensor([tokens]), pixel_values=torch.from_numpy(tiles), use_cache=False
            ).logits[0]
        if len(tokens) == len(ids) + NEW_TOKENS:
            return tokens[len(ids) :], logits[len(ids) - 1 :].numpy()
        tokens.append(int(logits[-1].argmax()))


def ours(internvl: InternVL, ids: list[int], tiles: np.ndarray, new_tokens: list[int], *, rows=None) -> np.ndarray:
    """The runtime's way: vision graph over every tile, rows spliced at ``vocab_size + k``, LLM graph prefill
    then decode; logits [NEW_TOKENS + 1, V]."""
    image_rows = internvl.graph(tiles) if rows is None else rows
    vocab = internvl.config["text_config"]["vocab_size"]
    runtime_ids = runtime_token_ids([ids], internvl.config["image_token_id"], vocab)
    embedding = load_file(str(internvl.llm_dir / "embedding.safetensors"))["embedding"]
    embeds = spliced_embeddings(runtime_ids, embedding, image_rows).astype(np.float16)
    capacity = len(ids) + NEW_TOKENS
    runner = LLMRunner(internvl.llm_dir, hf_rope_table(internvl.model, capacity), batch=1, capacity=capacity)
    logits = [runner.step([ids], embeds=embeds)[0, -1]]
    for token in new_tokens:
        logits.append(runner.step([[token]])[0, -1])
    return np.stack(logits)


def test_a_prompt_with_two_images_end_to_end_equals_transformers(internvl):
    """Runtime tiles -> vision graph -> splice at vocab_size + k -> LLM graph, against the transformers model's
    logits on the same tiles and ids, with equal greedy tokens; controls: the two images' tiles swapped, the
    rows spliced in reverse."""
    tiles, blocks = runtime_tiles(internvl)
    ids = prompt_ids(internvl, blocks)
    tokens, expected = reference(internvl, ids, tiles)
    got = ours(internvl, ids, tiles, tokens)
    result = compare_logits(got, expected)
    assert result.passed(TOL) and [int(row.argmax()) for row in got[:-1]] == tokens, result
    swapped = np.concatenate([tiles[blocks[0] :], tiles[: blocks[0]]])
    assert fails(compare_logits(ours(internvl, ids, swapped, tokens), expected), TOL)
    reversed_rows = internvl.graph(tiles)[::-1].copy()
    assert fails(compare_logits(ours(internvl, ids, tiles, tokens, rows=reversed_rows), expected), TOL)


def test_the_language_model_is_a_plain_qwen2_decoder_with_the_image_token(internvl):
    config = json.loads((internvl.llm_dir / "config.json").read_text())
    assert config["model"] == "internvl" and config["rope_scaling"] is None
    assert config["image_token_id"] == internvl.config["image_token_id"]
    template = json.loads((internvl.llm_dir / "processed_chat_template.json").read_text())
    assert template["content_types"]["image"]["format"] == "<IMG_CONTEXT>\n"


def test_the_vision_engine_profile_counts_whole_tiles(internvl):
    graph = onnx.load(str(internvl.visual_dir / "model.onnx"), load_external_data=False)
    [profile] = engine_profiles(graph, BuildLimits())
    assert profile[io.INPUT] == ((1, 3, 64, 64), (7, 3, 64, 64), (13, 3, 64, 64))
    [small] = engine_profiles(graph, BuildLimits(min_image_tokens=512, max_image_tokens=1024))
    assert small[io.INPUT][0][0] == 2 and small[io.INPUT][2][0] == 4
    with pytest.raises(ConfigError, match=r"build.max_image_tokens is 1000.*multiple of 256 \(e.g. 1024\)"):
        engine_profiles(graph, BuildLimits(max_image_tokens=1000))


def _refused(checkpoint: Path, tmp_path: Path, edit, name: str = "config.json") -> str:
    broken = tmp_path / "broken"
    shutil.copytree(checkpoint, broken)
    data = json.loads((broken / name).read_text())
    edit(data)
    (broken / name).write_text(json.dumps(data))
    with pytest.raises(SourceError) as refused:
        open_checkpoint(broken, model="m")
    message = str(refused.value)
    assert "\n" not in message and message.startswith("model 'm' (")
    return message


@pytest.mark.parametrize(
    ("edit", "name", "expected"),
    [
        (lambda c: c["text_config"].update(model_type="qwen3"), "config.json", "'qwen3' language model"),
        (lambda c: c.update(downsample_ratio=0.25), "config.json", "downsample_ratio 0.25 is not supported"),
        (lambda c: c.update(vision_feature_layer=[-1, -2]), "config.json", "a list of layers is not supported"),
        (lambda c: c.update(vision_feature_select_strategy="full"), "config.json", "keeps the CLS row"),
        (lambda c: c["vision_config"].update(patch_size=4), "config.json", "gives 64 image tokens"),
        (lambda c: c.update(size={"height": 448, "width": 448}), "preprocessor_config.json", "size is"),
    ],
)
def test_what_the_graph_cannot_express_is_refused_in_one_line(checkpoint_factory, tmp_path, edit, name, expected):
    assert expected in _refused(checkpoint_factory("internvl"), tmp_path, edit, name)
