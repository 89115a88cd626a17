"""End to end: a prompt with images through both exported graphs, as the Edge-LLM runtime runs a VLM.

The vision graph encodes the images; its rows replace the embeddings of the image-pad
tokens; the language model graph runs on those embeddings with the MRoPE table that
:mod:`edgellm_steps.verify.mrope` builds (prefill, then decode one token at a time).
The reference is the transformers VLM on the same ids and patches. The MRoPE module is
checked separately against transformers' own ``get_rope_index`` and rotary module, and
negative controls show the parity check catches a wrong table or a wrong splice.

The standard tiny checkpoints (weights drawn with std 0.02) attend almost uniformly: a
text-only rope table moves their logits by only 0.3% of max |logit| and reversed image rows
by 1-3%, both inside the fp16 tolerance. So every check runs on a "sharp" variant whose
decoder weights are drawn with std 0.2 (``initializer_range``): there the correct pipeline
stays within 0.3% and the wrong table or splice misses by 40-150%.
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
from edgellm_steps.models.families import VisionSpec, family_for
from edgellm_steps.models.vision_geometry import VisionDims, load_vision_dims
from edgellm_steps.verify.mrope import export_mrope_table, mrope_positions, mrope_table
from edgellm_steps.verify.parity import TOLERANCES, ParityResult, compare_logits
from edgellm_steps.verify.reference import LLMRunner
from edgellm_steps.verify.visual_inputs import visual_feeds

log = logging.getLogger(__name__)

VLM_CASES = ("qwen2_vl", "qwen2_5_vl")
#: (t, h, w) patch grids of the prompt's images, in order (multiples of the merge size 2).
PROMPTS = {"one-image": [(1, 8, 8)], "two-images": [(1, 4, 8), (1, 8, 8)]}
#: Greedy tokens decoded after the prompt.
NEW_TOKENS = 4
TOL = TOLERANCES["fp16"]
#: Our float64 angles vs transformers' float32 ones, positions below 100.
TABLE_ATOL = 2e-5
#: Checkpoint variants: the conftest's tiny VLM, and the same with position- and content-sensitive attention.
VARIANTS = {"tiny": {}, "sharp": {"initializer_range": 0.2}}


@dataclass
class Vlm:
    """One tiny VLM: its checkpoint, both exports and the transformers model."""

    checkpoint: Path
    llm_dir: Path
    visual_dir: Path
    config: dict
    spec: VisionSpec
    dims: VisionDims
    model: torch.nn.Module
    tokenizer: object
    session: ort.InferenceSession
    embedding: np.ndarray

    def token(self, key: str) -> int:
        return int(self.config[key])


@pytest.fixture(scope="module")
def vlm(exported, checkpoint_factory, tmp_path_factory):
    """``vlm(case, variant)`` -> :class:`Vlm`, exported (vision tower too) and loaded once per module."""
    import transformers
    from safetensors.numpy import load_file

    done: dict[tuple[str, str], Vlm] = {}

    def load(case: str, variant: str = "tiny") -> Vlm:
        if (case, variant) not in done:
            if VARIANTS[variant]:
                checkpoint = checkpoint_factory(case, **VARIANTS[variant])
                llm_dir = tmp_path_factory.mktemp(f"e2e-llm-{case}-{variant}") / "llm"
                export_llm(checkpoint, llm_dir)
            else:
                checkpoint, llm_dir = exported(case)
            visual_dir = tmp_path_factory.mktemp(f"e2e-visual-{case}-{variant}") / "visual"
            export_visual(checkpoint, visual_dir)
            config = json.loads((checkpoint / "config.json").read_text())
            spec = family_for(config).vision
            model = transformers.AutoModelForImageTextToText.from_pretrained(str(checkpoint), dtype=torch.float32)
            done[case, variant] = Vlm(
                checkpoint=checkpoint,
                llm_dir=llm_dir,
                visual_dir=visual_dir,
                config=config,
                spec=spec,
                dims=load_vision_dims(checkpoint, spec),
                model=model.eval(),
                tokenizer=transformers.AutoTokenizer.from_pretrained(str(checkpoint)),
                session=ort.InferenceSession(str(visual_dir / "model.onnx"), providers=["CPUExecutionProvider"]),
                embedding=load_file(str(llm_dir / "embedding.safetensors"))["embedding"],
            )
        return done[case, variant]

    return load


def prompt_ids(vlm: Vlm, grids: list[tuple[int, int, int]]) -> list[int]:
    """The chat template's tokens for text around the images, each image pad expanded to its token count."""
    content: list[dict] = [{"type": "text", "text": "Look at"}]
    for i in range(len(grids)):
        content += [{"type": "image"}, {"type": "text", "text": f" picture {i} and" if i + 1 < len(grids) else ""}]
    content.append({"type": "text", "text": " say what you see."})
    text = vlm.tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
    )
    ids = vlm.tokenizer(text, add_special_tokens=False)["input_ids"]
    pad, merge = vlm.token("image_token_id"), vlm.dims.merge_size
    assert ids.count(pad) == len(grids) and ids.count(vlm.token("vision_start_token_id")) == len(grids)
    counts = iter(t * h * w // merge**2 for t, h, w in grids)
    expanded: list[int] = []
    for token in ids:
        expanded += [pad] * next(counts) if token == pad else [token]
    return expanded


def random_patches(vlm: Vlm, grids, seed: int = 0) -> np.ndarray:
    rows = sum(t * h * w for t, h, w in grids)
    return np.random.default_rng(seed).standard_normal((rows, vlm.dims.patch_dim)).astype(np.float32)


def reference(vlm: Vlm, ids: list[int], patches: np.ndarray, grids) -> tuple[list[int], np.ndarray]:
    """The HF VLM's greedy tokens and its logits [NEW_TOKENS + 1, V]: the prompt's last, then each decode step.

    Every forward is a full one over the prompt plus the tokens so far (no cache), so
    transformers computes the MRoPE positions of the whole sequence itself.
    """
    pixel_values, grid_thw = torch.from_numpy(patches), torch.tensor(grids)
    tokens = list(ids)
    while True:
        input_ids = torch.tensor([tokens])
        mm_token_type_ids = (input_ids == vlm.token("image_token_id")).int()  # 1 marks an image token
        with torch.no_grad():
            logits = vlm.model(
                input_ids=input_ids,
                pixel_values=pixel_values,
                image_grid_thw=grid_thw,
                mm_token_type_ids=mm_token_type_ids,
                use_cache=False,
            ).logits[0]
        if len(tokens) == len(ids) + NEW_TOKENS:
            return tokens[len(ids) :], logits[len(ids) - 1 :].numpy()
        tokens.append(int(logits[-1].argmax()))


def image_embeddings(vlm: Vlm, patches: np.ndarray, grids) -> np.ndarray:
    """The vision graph's output [image tokens, hidden] float16, fed as the runtime feeds it."""
    feeds = visual_feeds(patches, grids, vlm.dims, windowed=vlm.spec.window_attention)
    return vlm.session.run([io.OUTPUT], feeds)[0]


def ours(
    vlm: Vlm,
    ids: list[int],
    patches: np.ndarray,
    grids,
    new_tokens: list[int],
    *,
    rope: np.ndarray | None = None,
    reverse_images: bool = False,
) -> np.ndarray:
    """Logits [NEW_TOKENS + 1, V] of the exported graphs: prefill with the images spliced in, then decode."""
    embeds = vlm.embedding[np.asarray(ids)].astype(np.float16)
    image = image_embeddings(vlm, patches, grids)
    pads = np.asarray(ids) == vlm.token("image_token_id")
    assert pads.sum() == len(image)
    embeds[pads] = image[::-1] if reverse_images else image
    capacity = len(ids) + NEW_TOKENS
    if rope is None:
        positions = mrope_positions(
            ids,
            grids,
            vision_start_id=vlm.token("vision_start_token_id"),
            merge_size=vlm.dims.merge_size,
            length=capacity,
        )
        rope = export_mrope_table(vlm.llm_dir, positions)
    runner = LLMRunner(vlm.llm_dir, rope, batch=1, capacity=capacity)
    rows = [runner.step([ids], embeds=embeds[None])[0, -1]]
    for token in new_tokens:  # the reference's tokens, so both sides see the same sequence
        rows.append(runner.step([[token]])[0, -1])
    return np.stack(rows)


def plain_rope(vlm: Vlm, length: int) -> np.ndarray:
    """A text-only table: every token at its index in all three components."""
    config = json.loads((vlm.llm_dir / "config.json").read_text())
    positions = np.broadcast_to(np.arange(length), (3, length))
    return mrope_table(
        positions, rope_theta=config["rope_theta"], mrope_section=config["rope_scaling"]["mrope_section"]
    )[None]


@pytest.mark.parametrize("prompt", sorted(PROMPTS))
@pytest.mark.parametrize("case", VLM_CASES)
def test_image_prompt_parity_with_transformers(vlm, case, prompt):
    """Prefill + NEW_TOKENS decode steps of both graphs match the HF VLM within the fp16 tolerance."""
    model, grids = vlm(case, "sharp"), PROMPTS[prompt]
    ids = prompt_ids(model, grids)
    patches = random_patches(model, grids)
    tokens, expected = reference(model, ids, patches, grids)
    got = ours(model, ids, patches, grids, tokens)
    result = compare_logits(got, expected)
    log.info("%s sharp %s (%d prompt tokens): %s", case, prompt, len(ids), result)
    assert result.passed(TOL), f"{case} {prompt}: {result}"
    assert got.argmax(-1)[:NEW_TOKENS].tolist() == tokens


@pytest.mark.parametrize("case", VLM_CASES)
def test_wrong_rope_or_splice_fails_the_check(vlm, case):
    """Negative controls (sharp variant): a text-only rope table, or the image rows reversed, miss the bound."""
    model, grids = vlm(case, "sharp"), PROMPTS["two-images"]
    ids = prompt_ids(model, grids)
    patches = random_patches(model, grids)
    tokens, expected = reference(model, ids, patches, grids)
    results: dict[str, ParityResult] = {
        "plain rope": compare_logits(
            ours(model, ids, patches, grids, tokens, rope=plain_rope(model, len(ids) + NEW_TOKENS)), expected
        ),
        "reversed images": compare_logits(ours(model, ids, patches, grids, tokens, reverse_images=True), expected),
    }
    for name, result in results.items():
        log.info("%s, %s: %s", case, name, result)
        assert not result.passed(TOL), f"{case} {name} passes the check: {result}"


@pytest.mark.parametrize("prompt", sorted(PROMPTS))
@pytest.mark.parametrize("case", VLM_CASES)
def test_mrope_positions_equal_get_rope_index(vlm, case, prompt):
    """Prompt positions equal transformers'; generated tokens follow its decode rule (index + rope delta)."""
    model, grids = vlm(case, "sharp"), PROMPTS[prompt]
    ids = prompt_ids(model, grids)
    input_ids = torch.tensor([ids])
    expected, delta = model.model.model.get_rope_index(
        input_ids,
        mm_token_type_ids=(input_ids == model.token("image_token_id")).int(),
        image_grid_thw=torch.tensor(grids),
    )
    start = model.token("vision_start_token_id")
    ours_ = mrope_positions(ids, grids, vision_start_id=start, merge_size=model.dims.merge_size, length=len(ids) + 3)
    assert ours_.dtype == np.int64 and ours_.shape == (3, len(ids) + 3)
    np.testing.assert_array_equal(ours_[:, : len(ids)], expected[:, 0].numpy())
    generated = np.arange(len(ids), len(ids) + 3) + int(delta[0, 0])
    np.testing.assert_array_equal(ours_[:, len(ids) :], np.broadcast_to(generated, (3, 3)))
    # The image tokens really spread over three different components (or the table test below proves little).
    image = np.asarray(ids) == model.token("image_token_id")
    assert len({tuple(ours_[:, i]) for i in np.flatnonzero(image)}) == image.sum()


@pytest.mark.parametrize("case", VLM_CASES)
def test_mrope_table_equals_the_hf_rotary_module(vlm, case):
    """Our table of an image prompt's positions is transformers' cos/sin; a wrong section split is not."""
    model, grids = vlm(case, "sharp"), PROMPTS["two-images"]
    ids = prompt_ids(model, grids)
    positions = mrope_positions(
        ids, grids, vision_start_id=model.token("vision_start_token_id"), merge_size=model.dims.merge_size
    )
    rotary = model.model.model.language_model.rotary_emb
    with torch.no_grad():
        cos, sin = rotary(torch.zeros(1, dtype=torch.float32), torch.from_numpy(positions)[:, None])
    half = cos.shape[-1] // 2
    expected = torch.cat([cos[..., :half], sin[..., :half]], dim=-1).numpy()  # [1, L, rot]
    table = export_mrope_table(model.llm_dir, positions)
    assert table.shape == expected.shape and table.dtype == np.float32
    np.testing.assert_allclose(table, expected, rtol=0, atol=TABLE_ATOL)
    config = json.loads((model.llm_dir / "config.json").read_text())
    assert config["rope_scaling"]["mrope_section"] == [2, 3, 3]
    # Any other split of the 8 frequencies misses the same bound by far (measured >= 0.09 for [3, 3, 2]).
    for wrong in ([3, 3, 2], [2, 2, 4], [3, 2, 3], [8, 0, 0]):
        other = mrope_table(positions, rope_theta=config["rope_theta"], mrope_section=wrong)[None]
        assert np.abs(other - expected).max() > 100 * TABLE_ATOL, f"section {wrong} gives the same table"


def test_mrope_positions_of_text_only_and_bad_prompts():
    text = mrope_positions([5, 6, 7], [], vision_start_id=1, merge_size=2, length=5)
    np.testing.assert_array_equal(text, np.broadcast_to(np.arange(5), (3, 5)))
    with pytest.raises(ValueError, match="1 vision_start tokens in the prompt but 0 image grids"):
        mrope_positions([1, 9, 9], [], vision_start_id=1, merge_size=2)
    with pytest.raises(ValueError, match="the prompt ends"):
        mrope_positions([1, 9, 9], [(1, 4, 4)], vision_start_id=1, merge_size=2)
    with pytest.raises(ValueError, match="shorter than the prompt"):
        mrope_positions([5, 6, 7], [], vision_start_id=1, merge_size=2, length=2)
