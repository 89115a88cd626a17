"""Qwen3-VL end to end, as the runtime runs it: vision graph -> splice -> language graph with deepstack inputs.

The vision graph encodes the images (``output`` and the deepstack features); the runtime's image ids
(``vocab_size + k``) take its rows in the embeddings, the deepstack inputs take the deepstack rows at
the same tokens and zeros elsewhere (:mod:`edgellm_steps.verify.vlm_splice`), and the language graph
runs on them with the interleaved MRoPE table (:mod:`edgellm_steps.verify.mrope`): prefill, then
decode steps with zero deepstack inputs. The reference is ``Qwen3VLForConditionalGeneration`` on the
same ids and patches. The checkpoint is made position- and content-sensitive (decoder weights with
std 0.2, a trained-like tower: see ``support.rescaled_copy``), so each negative control (deepstack
inputs zeroed, the consecutive-section rope table, nearest position sampling) must miss the bound.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from edgellm_steps.export import visual_io as io
from edgellm_steps.export.export_llm import export_llm
from edgellm_steps.export.export_visual import export_visual
from edgellm_steps.models.vision_geometry import VisionDims, open_vision_tower
from edgellm_steps.verify.mrope import export_mrope_table, mrope_positions, mrope_table
from edgellm_steps.verify.parity import TOLERANCES, compare_logits
from edgellm_steps.verify.reference import LLMRunner
from edgellm_steps.verify.visual_inputs import visual_feeds
from edgellm_steps.verify.vlm_splice import deepstack_feeds, runtime_token_ids, spliced_embeddings

from .support import TRAINED_LIKE, rescaled_copy

log = logging.getLogger(__name__)

#: The trained-like tower, and deepstack mergers whose rows are as large as a trained model's (the random
#: ones add rows of std ~0.01 to hidden states of std ~1, and dropping them would change nothing measurable).
FACTORS = dict(TRAINED_LIKE)
FACTORS |= {f"deepstack_merger_list.{k}.linear_fc2.weight": 40.0 for k in range(3)}
#: (t, h, w) patch grids: one image, and two of different sizes.
PROMPTS = {"one-image": [(1, 8, 8)], "two-images": [(1, 4, 8), (1, 8, 12)]}
NEW_TOKENS = 3
TOL = TOLERANCES["fp16"]


@dataclass
class Qwen3Vl:
    checkpoint: Path
    llm_dir: Path
    config: dict
    dims: VisionDims
    model: torch.nn.Module
    session: ort.InferenceSession

    def token(self, key: str) -> int:
        return int(self.config[key])


@pytest.fixture(scope="module")
def vlm(checkpoint_factory, tmp_path_factory) -> Qwen3Vl:
    import transformers

    root = tmp_path_factory.mktemp("qwen3-vl-e2e")
    checkpoint = rescaled_copy(checkpoint_factory("qwen3_vl", initializer_range=0.2), root / "ckpt", FACTORS)
    export_llm(checkpoint, root / "llm")
    export_visual(checkpoint, root / "visual")
    model = transformers.Qwen3VLForConditionalGeneration.from_pretrained(str(checkpoint), dtype=torch.float32)
    return Qwen3Vl(
        checkpoint=checkpoint,
        llm_dir=root / "llm",
        config=json.loads((checkpoint / "config.json").read_text()),
        dims=open_vision_tower(checkpoint).dims,
        model=model.eval(),
        session=ort.InferenceSession(str(root / "visual/model.onnx"), providers=["CPUExecutionProvider"]),
    )


def prompt_ids(vlm: Qwen3Vl, grids) -> list[int]:
    """Plain words around each image (vision_start, its pads, vision_end); ids above the special tokens."""
    ids = [105, 106]
    for i, (t, h, w) in enumerate(grids):
        pads = [vlm.token("image_token_id")] * (t * h * w // vlm.dims.merge_size**2)
        ids += [vlm.token("vision_start_token_id"), *pads, vlm.token("vision_end_token_id"), 110 + i]
    return [*ids, 120, 121]


def reference(vlm: Qwen3Vl, ids, patches, grids) -> tuple[list[int], np.ndarray]:
    """The HF VLM's greedy tokens and logits [NEW_TOKENS + 1, V] (full forwards, no cache)."""
    tokens = list(ids)
    while True:
        input_ids = torch.tensor([tokens])
        with torch.no_grad():
            logits = vlm.model(
                input_ids=input_ids,
                pixel_values=torch.from_numpy(patches),
                image_grid_thw=torch.tensor(grids),
                mm_token_type_ids=(input_ids == vlm.token("image_token_id")).int(),
                use_cache=False,
            ).logits[0]
        if len(tokens) == len(ids) + NEW_TOKENS:
            return tokens[len(ids) :], logits[len(ids) - 1 :].numpy()
        tokens.append(int(logits[-1].argmax()))


def ours(vlm: Qwen3Vl, ids, patches, grids, new_tokens, *, drop_deepstack=False, consecutive=False, nearest=False):
    """Logits [NEW_TOKENS + 1, V] of the two exported graphs, fed as the runtime feeds them."""
    feeds = visual_feeds(patches, grids, vlm.dims, windowed=False, position_mode="nearest" if nearest else "bilinear")
    names = [o.name for o in vlm.session.get_outputs()]
    outputs = dict(zip(names, vlm.session.run(None, feeds), strict=True))
    deep_rows = [outputs[io.DEEPSTACK_FEATURES.format(k=k)] for k in range(3)]
    embedding = vlm.model.model.language_model.embed_tokens.weight.detach().numpy()
    runtime = runtime_token_ids([ids], vlm.token("image_token_id"), embedding.shape[0])
    embeds = spliced_embeddings(runtime, embedding, outputs[io.OUTPUT])
    deepstack = None if drop_deepstack else deepstack_feeds(runtime, embedding.shape[0], deep_rows)
    capacity = len(ids) + NEW_TOKENS
    positions = mrope_positions(
        ids, grids, vision_start_id=vlm.token("vision_start_token_id"), merge_size=vlm.dims.merge_size, length=capacity
    )
    if consecutive:
        rope = mrope_table(positions, rope_theta=5e6, mrope_section=[2, 3, 3])[None]
    else:
        rope = export_mrope_table(vlm.llm_dir, positions)
    runner = LLMRunner(vlm.llm_dir, rope, batch=1, capacity=capacity)
    rows = [runner.step([ids], embeds=embeds, deepstack=deepstack)[0, -1]]
    for token in new_tokens:  # decode: no deepstack rows (the runner binds zeros)
        rows.append(runner.step([[token]])[0, -1])
    return np.stack(rows)


def random_patches(vlm: Qwen3Vl, grids, seed: int = 0) -> np.ndarray:
    rows = sum(t * h * w for t, h, w in grids)
    return np.random.default_rng(seed).standard_normal((rows, vlm.dims.patch_dim)).astype(np.float32)


@pytest.mark.parametrize("prompt", sorted(PROMPTS))
def test_image_prompt_parity_with_transformers(vlm, prompt):
    grids = PROMPTS[prompt]
    ids = prompt_ids(vlm, grids)
    patches = random_patches(vlm, grids)
    tokens, expected = reference(vlm, ids, patches, grids)
    got = ours(vlm, ids, patches, grids, tokens)
    result = compare_logits(got, expected)
    log.info("qwen3_vl %s (%d prompt tokens): %s", prompt, len(ids), result)
    assert result.passed(TOL), result
    assert got.argmax(-1)[:NEW_TOKENS].tolist() == tokens


def test_each_runtime_input_matters(vlm):
    """Negative controls: deepstack inputs zeroed, consecutive rope sections, nearest positions miss the bound."""
    grids = PROMPTS["two-images"]
    ids = prompt_ids(vlm, grids)
    patches = random_patches(vlm, grids)
    tokens, expected = reference(vlm, ids, patches, grids)
    for control in ("drop_deepstack", "consecutive", "nearest"):
        result = compare_logits(ours(vlm, ids, patches, grids, tokens, **{control: True}), expected)
        log.info("qwen3_vl control %s: %s", control, result)
        assert not result.passed(TOL), f"{control} passes the check: {result}"
