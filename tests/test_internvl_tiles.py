"""The InternVL3 tiling the runtime performs (contract 7.3), checked against transformers, not against itself.

References: the grid helpers and the PIL image processor of ``transformers.models.got_ocr2``
(the torchvision module cannot be imported here without torchvision; its helpers are compared to
the PIL module's by their parsed source), and ``InternVLProcessor`` built offline from a tiny
word-level tokenizer that carries InternVL's ``<img>`` / ``</img>`` / ``<IMG_CONTEXT>`` tokens.
Where the runtime differs from transformers (a thumbnail for every image, the stb resampler) the
test pins the difference by hand, as read from the runtime's source. Each check has a negative
control that must fail: tiles in column-major order, the thumbnail first, a reversed tie rule,
another normalization, the runtime's thumbnail rule against HF's counts.
"""

from __future__ import annotations

import ast
import itertools
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast
from transformers.models.got_ocr2 import image_processing_pil_got_ocr2 as hf_pil
from transformers.models.internvl.processing_internvl import InternVLProcessor

from edgellm_steps.verify import image_resize
from edgellm_steps.verify import internvl_tiles as tiles

S = 448
#: Image sizes (height, width): square, wide, tall, tiny, huge, and exact aspect-ratio ties on both sides of the
#: tie rule (ratios 1 and 2 around 633/634 px; ratio 6.5, midway between the 6x1 and 7x1 grids).
SIZES = [
    (448, 448),
    (1, 1),
    (3, 2000),
    (2000, 3),
    (300, 700),
    (700, 300),
    (1080, 1920),
    (1920, 1080),
    (10000, 10000),
    (12000, 400),
    (633, 633),
    (634, 634),
    (633, 1266),
    (634, 1268),
    (950, 950),
    (951, 951),
    (328, 2132),
    (330, 2145),
    (2132, 328),
    (2145, 330),
    (17, 53),
    (999, 1001),
]
#: (min_tiles, max_tiles, tile size) settings: InternVL3's default, the runtime's limits for a few engines, others.
SETTINGS = [(1, 12, 448), (1, 6, 448), (2, 9, 448), (1, 1, 448), (4, 4, 448), (1, 40, 384), (3, 24, 32)]
#: Word-level vocabulary of the offline InternVL tokenizer; the image tokens are added as special tokens.
VOCAB = {"[UNK]": 0, "describe": 1, "this": 2, "and": 3, "that": 4, ".": 5}
IMG_START, IMG_END, IMG_CONTEXT = "<img>", "</img>", "<IMG_CONTEXT>"


def hf_image_processor(min_tiles: int = 1, max_tiles: int = 12, tile_size: int = S) -> hf_pil.GotOcr2ImageProcessorPil:
    """transformers' PIL processor configured as InternVL3's ``-hf`` checkpoints configure it."""
    return hf_pil.GotOcr2ImageProcessorPil(
        size={"height": tile_size, "width": tile_size},
        crop_to_patches=True,
        min_patches=min_tiles,
        max_patches=max_tiles,
        image_mean=list(tiles.IMAGENET_MEAN),
        image_std=list(tiles.IMAGENET_STD),
    )


def hf_pixels(image: np.ndarray, **kwargs) -> np.ndarray:
    """The processor's ``pixel_values`` for one image, [blocks, 3, S, S]; kwargs go to the call."""
    return np.stack(hf_image_processor()(images=[image], return_tensors="np", **kwargs)["pixel_values"])


def smooth_image(height: int, width: int, seed: int) -> np.ndarray:
    """A photo-like uint8 image: random low-frequency colour fields plus a little noise."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)
    field = np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BILINEAR), np.float64)
    return np.clip(field + rng.normal(0, 6, field.shape), 0, 255).astype(np.uint8)


def noise_image(height: int, width: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


# ---- grid choice ---------------------------------------------------------------------------------------------


def test_got_ocr2_helpers_are_the_same_in_both_processors():
    """The PIL module's grid helpers are the torchvision module's (that module needs torchvision to import)."""
    torchvision_module = Path(hf_pil.__file__).with_name("image_processing_got_ocr2.py")

    def functions(path: Path) -> dict[str, str]:
        tree = ast.parse(path.read_text())
        return {
            node.name: ast.dump(ast.Module(body=node.body, type_ignores=[]))
            for node in tree.body
            if isinstance(node, ast.FunctionDef)
        }

    ours, theirs = functions(Path(hf_pil.__file__)), functions(torchvision_module)
    for name in ("get_all_supported_aspect_ratios", "get_optimal_tiled_canvas"):
        assert ours[name] == theirs[name], name


@pytest.mark.parametrize(("min_tiles", "max_tiles", "tile_size"), SETTINGS)
def test_candidate_grids_are_transformers(min_tiles, max_tiles, tile_size):
    assert tiles.candidate_grids(min_tiles, max_tiles) == hf_pil.get_all_supported_aspect_ratios(min_tiles, max_tiles)


@pytest.mark.parametrize(("min_tiles", "max_tiles", "tile_size"), SETTINGS)
def test_tile_grid_is_transformers(min_tiles, max_tiles, tile_size):
    """(rows, cols) equal transformers' (cols, rows) on every size, ties on both sides of the area rule included."""
    for height, width in SIZES:
        cols, rows = hf_pil.get_optimal_tiled_canvas((height, width), (tile_size, tile_size), min_tiles, max_tiles)
        got = tiles.tile_grid(height, width, tile_size=tile_size, min_tiles=min_tiles, max_tiles=max_tiles)
        assert got == (rows, cols), (height, width)


def test_tie_rule_decides_the_listed_ties():
    """The tie sizes really are ties decided by the area rule: a reversed rule picks another grid on each."""

    def reversed_rule(height: int, width: int) -> tuple[int, int]:
        best, best_diff = (1, 1), float("inf")
        for cols, rows in tiles.candidate_grids(1, 12):
            diff = abs(width / height - cols / rows)
            if diff < best_diff or (diff == best_diff and height * width <= 0.5 * S * S * cols * rows):
                best, best_diff = (cols, rows), diff
        return best[1], best[0]

    ties = [(633, 633), (634, 634), (633, 1266), (634, 1268), (950, 950), (951, 951), (328, 2132), (330, 2145)]
    expected = [(1, 1), (2, 2), (1, 2), (2, 4), (2, 2), (3, 3), (1, 6), (1, 7)]
    assert [tiles.tile_grid(h, w) for h, w in ties] == expected
    assert all(reversed_rule(h, w) != grid for (h, w), grid in zip(ties, expected, strict=True))


def test_std_sort_order_cannot_matter_with_one_tile_minimum():
    """The docstring's claim: with min_tiles 1, two grids of one area are never both the closest, so the
    runtime's std::sort (unstable beyond 16 candidates) picks what the stable order picks; with a higher
    minimum it can (3x4 and 4x3 for 10..14 tiles)."""

    def equal_area_ties(min_tiles: int, max_tiles: int) -> list[tuple]:
        grids = tiles.candidate_grids(min_tiles, max_tiles)
        found = []
        for a, b in itertools.combinations(grids, 2):
            if a[0] * a[1] != b[0] * b[1]:
                continue
            middle = (Fraction(*a) + Fraction(*b)) / 2
            gap = abs(middle - Fraction(*a))
            if all(abs(middle - Fraction(*g)) >= gap for g in grids):
                found.append((a, b))
        return found

    assert all(not equal_area_ties(1, top) for top in range(1, 25))
    assert ((3, 4), (4, 3)) in equal_area_ties(10, 14)


def test_runtime_tile_limits():
    """Worked by hand from the runner: tokens // 256 - 1 (room for the thumbnail), at least 1."""
    assert tiles.runtime_tile_limits(512, 13 * 256) == (1, 12)
    assert tiles.runtime_tile_limits(0, 0) == (1, 1)
    assert tiles.runtime_tile_limits(3 * 256, 7 * 256 + 255) == (2, 6)


# ---- tile count and thumbnail --------------------------------------------------------------------------------


@pytest.mark.parametrize(("min_tiles", "max_tiles"), [(1, 12), (1, 6), (2, 9), (1, 1)])
def test_block_count_is_transformers_with_the_hf_thumbnail_rule(min_tiles, max_tiles):
    processor = hf_image_processor(min_tiles, max_tiles)
    for height, width in SIZES:
        expected = processor.get_number_of_image_patches(height, width, {"crop_to_patches": True})
        got = tiles.block_count(height, width, min_tiles=min_tiles, max_tiles=max_tiles, thumbnail="multi_tile")
        assert got == expected, (height, width)


def test_runtime_thumbnail_rule_adds_one_block_to_every_image():
    """The 0.5 runner appends a thumbnail after every image's tiles: one-tile images take 2 blocks, not 1."""
    processor = hf_image_processor()
    counts = [
        (processor.get_number_of_image_patches(h, w, {"crop_to_patches": True}), tiles.block_count(h, w))
        for h, w in SIZES
    ]
    single = [(hf, rt) for hf, rt in counts if hf == 1]
    assert single and all(rt == 2 for _, rt in single)
    assert all(rt == hf for hf, rt in counts if hf > 1)
    # Negative control: the runtime's rule is not transformers' on a one-tile image.
    assert tiles.block_count(448, 448) != processor.get_number_of_image_patches(448, 448, {"crop_to_patches": True})


# ---- pixels --------------------------------------------------------------------------------------------------

#: (height, width, seed, maker): a 2 x 5 grid with a thumbnail, tall, tiny (upsampled 13 tiles), one tile, noise.
PIXEL_CASES = [
    (300, 700, 0, smooth_image),
    (900, 350, 1, smooth_image),
    (50, 60, 2, smooth_image),
    (500, 460, 3, smooth_image),
    (240, 500, 4, noise_image),
]


@pytest.fixture(scope="module")
def hf_blocks():
    return {case: hf_pixels(case[3](*case[:3])) for case in PIXEL_CASES}


@pytest.mark.parametrize("case", PIXEL_CASES, ids=[f"{h}x{w}" for h, w, *_ in PIXEL_CASES])
def test_tiles_equal_the_pil_processor(case, hf_blocks):
    """Tile order, thumbnail placement, resampling and normalization: equal to the last bit."""
    expected = hf_blocks[case]
    got = tiles.tile_image(case[3](*case[:3]), thumbnail="multi_tile")
    assert got.dtype == np.float32 and got.shape == expected.shape
    assert np.array_equal(got, expected)


def test_tile_negative_controls(hf_blocks):
    """Column-major tiles, the thumbnail first, and CLIP's normalization each miss the processor's pixels."""
    case = PIXEL_CASES[0]
    expected = hf_blocks[case]
    got = tiles.tile_image(case[3](*case[:3]), thumbnail="multi_tile")
    rows, cols = tiles.tile_grid(*case[:2])
    assert (rows, cols) == (2, 5)
    column_major = np.concatenate(
        [got[:-1].reshape(rows, cols, 3, S, S).transpose(1, 0, 2, 3, 4).reshape(-1, 3, S, S), got[-1:]]
    )
    thumbnail_first = np.concatenate([got[-1:], got[:-1]])
    clip = tiles.tile_image(
        case[3](*case[:3]), thumbnail="multi_tile", mean=hf_pil.OPENAI_CLIP_MEAN, std=hf_pil.OPENAI_CLIP_STD
    )
    for wrong in (column_major, thumbnail_first, clip):
        assert np.abs(wrong - expected).max() > 0.1


def test_runtime_thumbnail_on_one_tile_repeats_the_single_block(hf_blocks):
    """Under the runtime's rule a one-tile image is its tile plus a thumbnail, both the S x S resize."""
    case = PIXEL_CASES[3]
    expected = hf_blocks[case]
    assert len(expected) == 1
    got = tiles.tile_image(case[3](*case[:3]))
    assert np.array_equal(got, np.concatenate([expected, expected]))
    multi = PIXEL_CASES[0]
    assert np.array_equal(tiles.tile_image(multi[3](*multi[:3])), hf_blocks[multi])


def test_float_images_convert_as_transformers_does():
    """Floats in [0, 1] as transformers' processor takes them with do_rescale=False (with True it divides twice)."""
    image = smooth_image(120, 260, 5).astype(np.float64) / 255 * 0.999
    assert np.array_equal(tiles.tile_image(image, thumbnail="multi_tile"), hf_pixels(image, do_rescale=False))


def test_vision_input_concatenates_images_in_order(hf_blocks):
    images = [case[3](*case[:3]) for case in PIXEL_CASES[:3]]
    feed, counts = tiles.vision_input(images, thumbnail="multi_tile")
    expected = np.concatenate([hf_blocks[case] for case in PIXEL_CASES[:3]])
    assert counts == [len(hf_blocks[case]) for case in PIXEL_CASES[:3]]
    assert feed.dtype == np.float16 and np.array_equal(feed, expected.astype(np.float16))


# ---- the stb resampler's mechanics ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "target"), [((37, 53), (37, 120)), ((100, 7), (448, 7)), ((1000, 7), (448, 7)), ((13, 900), (13, 448))]
)
def test_separable_resampler_is_pil_bicubic_on_one_axis(source, target):
    """Our taps with Catmull-Rom and PIL's edge handling are PIL's bicubic within 1 (its fixed-point rounding),
    up and down; a Mitchell kernel there (stb's shrinking filter) is not. One axis at a time: Pillow 13
    chooses the order of its two passes, with uint8 rounding between them, by a rule not reproduced here."""
    image = noise_image(*source, seed=7)
    pil = np.asarray(Image.fromarray(image).resize(target[::-1], Image.Resampling.BICUBIC)).astype(int)
    ours = image_resize.resize_separable(
        image, *target, kernels=(image_resize.catmull_rom, image_resize.catmull_rom), edge="trim"
    )
    assert np.abs(ours.astype(int) - pil).max() <= 1
    assert (ours.astype(int) != pil).mean() < 1e-3
    if target[0] < source[0] or target[1] < source[1]:
        wrong = image_resize.resize_separable(
            image, *target, kernels=(image_resize.mitchell, image_resize.mitchell), edge="trim"
        )
        assert np.abs(wrong.astype(int) - pil).max() > 10


def test_stb_resampler_keeps_a_same_size_image_and_stays_near_pil():
    """Catmull-Rom interpolates, so the runtime's resize of a 448 x 448 image is the image. On photo-like images
    the stb approximation differs from PIL by mean 0.2-0.7 and max 2-5 uint8 steps (measured over six sizes;
    this one: mean 0.22, max 3); on pure noise by up to 37 (Mitchell smooths where Catmull-Rom rings)."""
    image = smooth_image(448, 448, 8)
    assert np.array_equal(tiles.tile_image(image, resample="stb")[0], tiles.normalize(image.transpose(2, 0, 1)))
    photo = smooth_image(700, 1000, 9)
    stb = tiles.tile_image(photo, resample="stb")
    pil = tiles.tile_image(photo)
    steps = np.abs(stb - pil) * np.asarray(tiles.IMAGENET_STD, np.float32)[:, None, None] * 255
    assert steps.mean() < 0.5 and steps.max() <= 6


# ---- prompt expansion ----------------------------------------------------------------------------------------


class OfflineInternVLProcessor(InternVLProcessor):
    """InternVLProcessor without a video processor: its class check needs torchvision, which is not installed."""

    def check_argument_for_proper_class(self, argument_name, argument):
        return None if argument is None else super().check_argument_for_proper_class(argument_name, argument)


@pytest.fixture(scope="module")
def processor():
    word_level = Tokenizer(models.WordLevel(VOCAB, unk_token="[UNK]"))
    word_level.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=word_level,
        unk_token="[UNK]",
        extra_special_tokens={
            "start_image_token": IMG_START,
            "end_image_token": IMG_END,
            "context_image_token": IMG_CONTEXT,
            "video_token": "<video>",
        },
    )
    return OfflineInternVLProcessor(image_processor=hf_image_processor(), tokenizer=tokenizer, image_seq_length=256)


def test_prompt_expansion_is_internvl_processor(processor):
    """Two requests, three images of different tile counts: expanding the unexpanded prompt as the runtime does
    (with HF's thumbnail rule) gives the processor's input_ids; the vocab_size + k ids follow them one to one."""
    tok = processor.tokenizer
    shapes = [[(300, 700), (448, 448)], [(500, 1000)]]
    images = [[smooth_image(h, w, i) for i, (h, w) in enumerate(request)] for request in shapes]
    texts = [f"describe {IMG_CONTEXT} and {IMG_CONTEXT} .", f"{IMG_CONTEXT} describe that"]
    hf_ids = processor(images=images, text=texts)["input_ids"]

    image_token_id = tok.context_image_token_id
    blocks = [tiles.block_count(h, w, thumbnail="multi_tile") for request in shapes for h, w in request]
    assert blocks == [11, 1, 3]
    plain = [tok(text)["input_ids"] for text in texts]
    ids = dict(image_token_id=image_token_id, img_start_id=tok.start_image_token_id, img_end_id=tok.end_image_token_id)
    expanded = [tiles.expand_prompt(plain[0], blocks[:2], **ids), tiles.expand_prompt(plain[1], blocks[2:], **ids)]
    assert expanded == [list(row) for row in hf_ids]

    vocab_size = 1000
    runtime = tiles.runtime_prompt_ids(plain, blocks, vocab_size=vocab_size, **ids)
    image_rows = runtime >= vocab_size
    assert runtime[image_rows].tolist() == list(range(vocab_size, vocab_size + 256 * sum(blocks)))
    for b, row in enumerate(hf_ids):
        hf = np.asarray(row)
        assert np.array_equal(image_rows[b, : len(hf)], hf == image_token_id)
        assert np.array_equal(runtime[b, : len(hf)][hf != image_token_id], hf[hf != image_token_id])

    # Negative control: the runtime's own thumbnail rule expands the one-tile image to 512 tokens, not 256.
    runtime_blocks = [tiles.block_count(h, w) for request in shapes for h, w in request]
    assert tiles.expand_prompt(plain[0], runtime_blocks[:2], **ids) != list(hf_ids[0])


def test_image_token_ids_by_hand():
    """The runner's defaults: <img> 151665, 256 placeholders per block, </img> 151666."""
    assert tiles.image_token_ids(2, image_token_id=151667) == [151665, *[151667] * 512, 151666]
    with pytest.raises(ValueError, match="2 image placeholders but 1 images"):
        tiles.expand_prompt([7, 151667, 151667], [1], image_token_id=151667)
