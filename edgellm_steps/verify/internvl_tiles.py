"""What the Edge-LLM runtime feeds an InternVL3 vision engine and language model for an image (contract 7.3).

Verification needs the runtime's inputs without the runtime: which tiles an image becomes, in
which order, with which pixels, and how many image tokens the prompt gets. Everything here is
worked out from the classic runtime's InternVL runner (release line 0.5: ``InternViTRunner``,
``imageUtils::computeBestBlockGridForResize``, ``imageUtils::resizeImage`` and the
``normalizeImage`` / ``transposeToPatchInternVLPhi4MM`` kernels; the same in the 0.4 and 0.6.1 sources),
and checked against transformers' InternVL / GOT-OCR2 processors in
``tests/test_internvl_tiles.py``. Facts read from that source:

- **Grid.** The tile grid is InternVL's dynamic preprocessing: every (cols, rows) with
  ``min_tiles <= cols * rows <= max_tiles``, ordered by area, and the one whose cols/rows is
  closest to width/height wins; on an exact tie a later (larger or equal) grid replaces the best
  one only when the image area exceeds half the grid's pixel area. The runtime derives the tile
  limits from the engine's ``builder_config``: ``max(1, min_image_tokens // 256 - 1)`` and
  ``max(1, max_image_tokens_per_image // 256 - 1)``, the "- 1" leaving room for the thumbnail
  (:func:`runtime_tile_limits`).
- **Thumbnail.** The 0.5 runtime appends a thumbnail (the whole image resized to S x S) after the
  tiles of *every* image, also when the grid is a single tile, so a one-tile image costs two
  blocks (512 tokens). transformers' processor (and InternVL's own ``dynamic_preprocess``) adds it
  only when there is more than one tile; the runtime's 0.11 line switched to that rule. Hence
  the ``thumbnail`` switch: ``"always"`` (the runtime, default) or ``"multi_tile"`` (HF).
- **Order.** Tiles are cut row-major from the image resized to (rows * S, cols * S); the
  thumbnail comes last. Images follow each other in prompt order, across the whole batch.
- **Pixels.** The runtime resizes on the host with stb_image_resize2's
  ``stbir_resize_uint8_linear`` (uint8 in and out, default filters: Catmull-Rom when an axis is
  enlarged, Mitchell-Netravali B = C = 1/3 when it shrinks, edges clamped; so in the 0.4 and
  0.6.1 sources, while the one 0.5.0 copy found, a fork, passes Catmull-Rom for both, a change its
  comment gives as the fork's own), not with PIL's bicubic as transformers does. It then computes
  ``(u8 / 255 - mean) / std`` in float32 and binds float16, with mean/std fixed to ImageNet's
  (0.485, 0.456, 0.406) / (0.229, 0.224, 0.225) in the runner (not read from the checkpoint).
- **Prompt.** Each image placeholder id (``image_token_id``, ``<IMG_CONTEXT>``) in the tokenized
  prompt becomes ``<img>``, then ``256 * blocks`` ids ``vocab_size + k`` (k counting image rows
  across the batch), then ``</img>``. The 0.5 runner does not read the ``<img>`` / ``</img>`` ids
  from the config: it uses 151665 / 151666, the ids of Qwen2.5-based InternVL3 checkpoints, and
  256 tokens per block is also a constant there.

Two resamplers are offered. ``"pil"`` is PIL's bicubic exactly as transformers' PIL processor
calls it, so tiles equal the processor's ``pixel_values`` bit for bit; it is the default because
verification compares against transformers. ``"stb"`` approximates the runtime's resampler from its
documented filters; it is not bit-exact with the C library (pass order, coefficient trimming and
float rounding are not reproduced, and no copy of the library was at hand to measure against).
What it shows is the size of the runtime-versus-transformers gap: on photo-like images the two
resamplers differ by a mean 0.2-0.7 and a max 2-5 uint8 steps, on pure noise by up to 37.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Literal

import numpy as np

from edgellm_steps.models.tile_geometry import RUNTIME_IMAGE_BRACKETS, RUNTIME_TILE_TOKENS
from edgellm_steps.verify.image_resize import RESAMPLERS
from edgellm_steps.verify.vlm_splice import runtime_token_ids

logger = logging.getLogger(__name__)

#: Image rows per tile (InternVL3: (448 / 14)^2 patches, pixel shuffle 0.5); a constant in the 0.5 runner.
TOKENS_PER_TILE = RUNTIME_TILE_TOKENS
#: The 0.5 runner's fixed normalization (ImageNet's), RGB.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: ``<img>`` and ``</img>`` as the 0.5 runner hard-codes them (Qwen2.5-based InternVL3 tokenizers).
RUNTIME_IMG_START_ID = RUNTIME_IMAGE_BRACKETS["<img>"]
RUNTIME_IMG_END_ID = RUNTIME_IMAGE_BRACKETS["</img>"]

Thumbnail = Literal["always", "multi_tile", "never"]
Resample = Literal["pil", "stb"]


def runtime_tile_limits(min_image_tokens: int, max_image_tokens: int) -> tuple[int, int]:
    """(min_tiles, max_tiles) the runtime allows one image, from the vision engine's token limits.

    The runner divides ``builder_config.min_image_tokens`` / ``max_image_tokens_per_image`` by 256
    and subtracts one block for the thumbnail it always adds; at least one tile either way.
    """
    return (
        max(1, min_image_tokens // TOKENS_PER_TILE - 1),
        max(1, max_image_tokens // TOKENS_PER_TILE - 1),
    )


def candidate_grids(min_tiles: int, max_tiles: int) -> list[tuple[int, int]]:
    """Every (cols, rows) with min_tiles <= cols * rows <= max_tiles, by area, cols-major within an area.

    The order matters only through the tie rule of :func:`tile_grid`. The runtime sorts with
    ``std::sort``, which keeps this enumeration order for up to 16 candidates (insertion sort)
    but not beyond; two grids of the same area can only both be the closest when ``min_tiles``
    excludes every grid between them (e.g. 3x4 and 4x3 for 10..14 tiles), never with
    ``min_tiles`` 1, so the runtime's order is the one below in every ordinary configuration.
    """
    if not 1 <= min_tiles <= max_tiles:
        raise ValueError(f"tile limits {min_tiles}..{max_tiles}: need 1 <= min_tiles <= max_tiles")
    grids = [
        (cols, rows)
        for cols in range(1, max_tiles + 1)
        for rows in range(1, max_tiles + 1)
        if min_tiles <= cols * rows <= max_tiles
    ]
    return sorted(grids, key=lambda grid: grid[0] * grid[1])


def tile_grid(
    height: int, width: int, *, tile_size: int = 448, min_tiles: int = 1, max_tiles: int = 12
) -> tuple[int, int]:
    """(rows, cols) of the tile grid the runtime (and InternVL) picks for an image of height x width.

    Closest aspect ratio wins (float64 ``|w/h - cols/rows|``, as both the runtime and transformers
    compute it). On an exact tie the later grid wins when the image has more pixels than half the
    grid's: the runtime compares ``area > (S * S // 2) * tiles`` in integers, transformers
    ``area > 0.5 * S * S * tiles``; identical for an even tile area (448 * 448).
    """
    if height < 1 or width < 1:
        raise ValueError(f"image size {height}x{width}: both sides must be positive")
    aspect = width / height
    area = height * width
    half_tile = (tile_size * tile_size) // 2
    best_diff = float("inf")
    best = (1, 1)
    for cols, rows in candidate_grids(min_tiles, max_tiles):
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best_diff, best = diff, (cols, rows)
        elif diff == best_diff and area > half_tile * cols * rows:
            best = (cols, rows)
    logger.debug("image %dx%d -> %d x %d tiles of %d", height, width, best[1], best[0], tile_size)
    return best[1], best[0]


def has_thumbnail(tiles: int, thumbnail: Thumbnail = "always") -> bool:
    """Whether an image cut into ``tiles`` tiles gets a thumbnail block under the given rule."""
    if thumbnail == "always":
        return True
    if thumbnail == "multi_tile":
        return tiles > 1
    if thumbnail == "never":
        return False
    raise ValueError(f"thumbnail rule {thumbnail!r}: expected 'always', 'multi_tile' or 'never'")


def block_count(
    height: int,
    width: int,
    *,
    tile_size: int = 448,
    min_tiles: int = 1,
    max_tiles: int = 12,
    thumbnail: Thumbnail = "always",
) -> int:
    """Blocks (vision engine batch rows) one image becomes: its tiles plus the thumbnail if any."""
    rows, cols = tile_grid(height, width, tile_size=tile_size, min_tiles=min_tiles, max_tiles=max_tiles)
    return rows * cols + int(has_thumbnail(rows * cols, thumbnail))


def tile_image(
    image: np.ndarray,
    *,
    tile_size: int = 448,
    min_tiles: int = 1,
    max_tiles: int = 12,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    thumbnail: Thumbnail = "always",
    resample: Resample = "pil",
) -> np.ndarray:
    """[blocks, 3, S, S] float32: the image's tiles row-major, then the thumbnail, rescaled and normalized.

    ``image`` is (H, W, 3) RGB: uint8, integral values in [0, 255], or floats in [0, 1], which are
    scaled by 255 and truncated to uint8 as transformers' PIL conversion does. (transformers' own
    processor then divides by 255 twice unless called with ``do_rescale=False``; here it is once.)
    Normalization follows transformers' PIL processor: ``float32(u8 * (1 / 255))``, then
    ``(x - mean) / std`` in float32; the runtime's ``u8 / 255.0f`` differs by at most one float32
    ulp before it casts to float16.
    """
    pixels = _as_uint8(image)
    height, width = pixels.shape[:2]
    rows, cols = tile_grid(height, width, tile_size=tile_size, min_tiles=min_tiles, max_tiles=max_tiles)
    resize = RESAMPLERS.get(resample)
    if resize is None:
        raise ValueError(f"resample {resample!r}: expected one of {sorted(RESAMPLERS)}")
    canvas = resize(pixels, rows * tile_size, cols * tile_size)
    blocks = [
        canvas[r * tile_size : (r + 1) * tile_size, c * tile_size : (c + 1) * tile_size]
        for r in range(rows)
        for c in range(cols)
    ]
    if has_thumbnail(rows * cols, thumbnail):
        blocks.append(resize(pixels, tile_size, tile_size))
    stacked = np.stack(blocks).transpose(0, 3, 1, 2)
    return normalize(stacked, mean=mean, std=std)


def normalize(
    blocks: np.ndarray, *, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> np.ndarray:
    """uint8 [..., 3, H, W] to float32 ``(u8 / 255 - mean) / std``, channel by channel, as transformers does."""
    scaled = (blocks.astype(np.float64) * (1 / 255)).astype(np.float32)
    shape = (3, 1, 1)
    return (scaled - np.asarray(mean, np.float32).reshape(shape)) / np.asarray(std, np.float32).reshape(shape)


def vision_input(
    images: Sequence[np.ndarray],
    *,
    tile_size: int = 448,
    min_tiles: int = 1,
    max_tiles: int = 12,
    thumbnail: Thumbnail = "always",
    resample: Resample = "pil",
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> tuple[np.ndarray, list[int]]:
    """The vision engine's ``input`` for a batch's images in prompt order, and each image's block count.

    float16, as the runner binds it; the blocks of image k follow those of image k - 1.
    """
    per_image = [
        tile_image(
            image,
            tile_size=tile_size,
            min_tiles=min_tiles,
            max_tiles=max_tiles,
            mean=mean,
            std=std,
            thumbnail=thumbnail,
            resample=resample,
        )
        for image in images
    ]
    counts = [len(blocks) for blocks in per_image]
    if not per_image:
        return np.zeros((0, 3, tile_size, tile_size), np.float16), counts
    return np.concatenate(per_image).astype(np.float16), counts


def image_token_ids(
    blocks: int,
    *,
    image_token_id: int,
    img_start_id: int = RUNTIME_IMG_START_ID,
    img_end_id: int = RUNTIME_IMG_END_ID,
    tokens_per_block: int = TOKENS_PER_TILE,
) -> list[int]:
    """One image's ids in the prompt: ``<img>``, ``tokens_per_block * blocks`` placeholders, ``</img>``."""
    return [img_start_id, *([image_token_id] * (tokens_per_block * blocks)), img_end_id]


def expand_prompt(
    ids: Sequence[int],
    blocks: Sequence[int],
    *,
    image_token_id: int,
    img_start_id: int = RUNTIME_IMG_START_ID,
    img_end_id: int = RUNTIME_IMG_END_ID,
    tokens_per_block: int = TOKENS_PER_TILE,
) -> list[int]:
    """A tokenized prompt with its k-th ``image_token_id`` replaced by image k's expansion (:func:`image_token_ids`)."""
    placeholders = sum(1 for token in ids if token == image_token_id)
    if placeholders != len(blocks):
        raise ValueError(f"prompt has {placeholders} image placeholders but {len(blocks)} images")
    out: list[int] = []
    counts = iter(blocks)
    for token in ids:
        if token == image_token_id:
            out += image_token_ids(
                next(counts),
                image_token_id=image_token_id,
                img_start_id=img_start_id,
                img_end_id=img_end_id,
                tokens_per_block=tokens_per_block,
            )
        else:
            out.append(token)
    return out


def runtime_prompt_ids(
    batch_ids: Sequence[Sequence[int]],
    blocks: Sequence[int],
    *,
    image_token_id: int,
    vocab_size: int,
    img_start_id: int = RUNTIME_IMG_START_ID,
    img_end_id: int = RUNTIME_IMG_END_ID,
    tokens_per_block: int = TOKENS_PER_TILE,
) -> np.ndarray:
    """[B, S] ids the runtime feeds the language model: prompts expanded, image row k as ``vocab_size + k``.

    ``blocks`` lists every image of the batch in order (request by request), as the runner consumes
    them; rows are right-padded with 0 (:func:`edgellm_steps.verify.vlm_splice.runtime_token_ids`).
    """
    expanded = []
    start = 0
    for ids in batch_ids:
        count = sum(1 for token in ids if token == image_token_id)
        expanded.append(
            expand_prompt(
                ids,
                blocks[start : start + count],
                image_token_id=image_token_id,
                img_start_id=img_start_id,
                img_end_id=img_end_id,
                tokens_per_block=tokens_per_block,
            )
        )
        start += count
    if start != len(blocks):
        raise ValueError(f"batch has {start} image placeholders but {len(blocks)} images")
    return runtime_token_ids(expanded, image_token_id, vocab_size)


def _as_uint8(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 from uint8 or float pixels, converted as transformers converts them for PIL."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image of shape {image.shape}: expected (height, width, 3) RGB")
    if image.dtype == np.uint8:
        return image
    if not np.issubdtype(image.dtype, np.floating) and not np.issubdtype(image.dtype, np.integer):
        raise ValueError(f"image dtype {image.dtype}: expected uint8 or float")
    if np.allclose(image, image.astype(int)) and image.min() >= 0 and image.max() <= 255:
        return image.astype(np.uint8)
    if image.min() >= 0 and image.max() <= 1:
        # transformers' to_pil_image: x * 255 in float64, stored as float32, then a truncating cast.
        return (image.astype(np.float64) * 255).astype(np.float32).astype(np.uint8)
    raise ValueError(f"image values in [{image.min()}, {image.max()}]: expected [0, 1] floats or [0, 255]")
