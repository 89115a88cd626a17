"""Generated calibration images for the vision tower, and the patches the tower reads from them.

fp8 calibration of the vision encoder needs activations that look like those of real
photographs: smooth colour fields, hard edges, periodic and random textures. The build
runs offline and reproducibly, so images are drawn here with numpy alone (no download,
no Pillow or torchvision) from a fixed seed: the same calibration gives the same amax
and so the same engine bytes on every run.

Sizes are whole numbers of merge blocks (``patch_size * merge_size`` pixels, 28 for the
released models) and are fitted into the processor's ``min_pixels`` / ``max_pixels``, as
the runtime's resize would. Patches are made as the Qwen-VL image processor makes them:
rescale to [0, 1], normalize with the checkpoint's mean and std, repeat the frame
``temporal_patch_size`` times, then :func:`~edgellm_steps.verify.visual_inputs.patchify`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgellm_steps.errors import SourceError
from edgellm_steps.models.vision_geometry import PROCESSOR_CONFIG, Grid, VisionDims, patchify

#: Image shapes, in merge blocks (rows, columns): square, landscape, portrait and elongated, so that
#: calibration sees several grid sizes (and, for Qwen2.5-VL, whole and partial windows).
BLOCK_SHAPES: tuple[tuple[int, int], ...] = ((8, 8), (6, 10), (10, 6), (4, 14), (12, 12), (14, 4), (7, 9), (16, 8))
#: Mean / std of the released Qwen-VL processors (CLIP's), for configs that omit them.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
DEFAULT_SEED = 0


@dataclass(frozen=True)
class ImageProcessing:
    """What the checkpoint's image processor does to pixels before patchifying."""

    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    rescale_factor: float = 1 / 255
    min_pixels: int | None = None
    max_pixels: int | None = None


def read_image_processing(checkpoint: Path) -> ImageProcessing:
    """Mean, std, rescale factor and pixel bounds from ``preprocessor_config.json``.

    The bounds are top-level ``min_pixels`` / ``max_pixels`` in the released checkpoints and
    ``size.shortest_edge`` / ``size.longest_edge`` in processors saved by newer transformers.
    """
    path = Path(checkpoint) / PROCESSOR_CONFIG
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise SourceError(
            f"{path} cannot be read ({err}); fp8 vision calibration needs the processor's mean and std"
        ) from err
    size = config.get("size") or {}
    return ImageProcessing(
        mean=tuple(config.get("image_mean", CLIP_MEAN)),
        std=tuple(config.get("image_std", CLIP_STD)),
        rescale_factor=float(config.get("rescale_factor", 1 / 255)),
        min_pixels=config.get("min_pixels", size.get("shortest_edge")),
        max_pixels=config.get("max_pixels", size.get("longest_edge")),
    )


def fit_blocks(rows: int, cols: int, block: int, min_pixels: int | None, max_pixels: int | None) -> tuple[int, int]:
    """``rows`` x ``cols`` blocks of ``block`` pixels, scaled (aspect kept) into the pixel bounds."""
    area = rows * cols * block * block
    if max_pixels is not None and area > max_pixels:
        scale = math.sqrt(max_pixels / area)
        rows, cols = max(1, math.floor(rows * scale)), max(1, math.floor(cols * scale))
    elif min_pixels is not None and area < min_pixels:
        scale = math.sqrt(min_pixels / area)
        rows, cols = math.ceil(rows * scale), math.ceil(cols * scale)
    return rows, cols


def _coordinates(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel centres in [0, 1): y [H, 1] and x [1, W]."""
    return (np.arange(height)[:, None] + 0.5) / height, (np.arange(width)[None, :] + 0.5) / width


def _gradient(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Two colours blended along a random direction: sky, walls, out-of-focus backgrounds."""
    y, x = _coordinates(height, width)
    angle = rng.uniform(0, 2 * np.pi)
    t = np.clip(0.5 + (np.cos(angle) * (x - 0.5) + np.sin(angle) * (y - 0.5)), 0, 1)[..., None]
    start, end = rng.uniform(0, 1, 3), rng.uniform(0, 1, 3)
    return (1 - t) * start + t * end


def _discs(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Filled circles of random colour on a gradient: round objects with hard edges."""
    image = _gradient(rng, height, width)
    y, x = _coordinates(height, width)
    for _ in range(rng.integers(3, 8)):
        cy, cx, radius = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.05, 0.3)
        inside = (y - cy) ** 2 + ((x - cx) * width / height) ** 2 < radius**2
        image[inside] = rng.uniform(0, 1, 3)
    return image


def _rectangles(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Overlapping axis-aligned boxes: text blocks, windows, man-made scenes."""
    image = np.broadcast_to(rng.uniform(0, 1, 3), (height, width, 3)).copy()
    for _ in range(rng.integers(4, 10)):
        top, left = rng.integers(0, height), rng.integers(0, width)
        bottom, right = rng.integers(top + 1, height + 1), rng.integers(left + 1, width + 1)
        image[top:bottom, left:right] = rng.uniform(0, 1, 3)
    return image


def _stripes(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Sinusoidal stripes at a random angle and frequency: fabric, fences, high-frequency detail."""
    y, x = _coordinates(height, width)
    angle, cycles = rng.uniform(0, np.pi), rng.uniform(3, 30)
    wave = 0.5 + 0.5 * np.sin(2 * np.pi * cycles * (np.cos(angle) * x + np.sin(angle) * y))[..., None]
    light, dark = rng.uniform(0.5, 1, 3), rng.uniform(0, 0.5, 3)
    return dark + wave * (light - dark)


def _texture(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A sum of random low-frequency waves per channel plus pixel noise: foliage, skin, terrain."""
    y, x = _coordinates(height, width)
    image = np.zeros((height, width, 3))
    for channel in range(3):
        for _ in range(6):
            fy, fx = rng.uniform(-12, 12, 2)
            image[..., channel] += rng.uniform(0.2, 1) * np.sin(
                2 * np.pi * (fy * y + fx * x) + rng.uniform(0, 2 * np.pi)
            )
    image = (image - image.min()) / max(np.ptp(image), 1e-6)
    noise = rng.uniform(0, 1, (height, width, 3))
    blend = rng.uniform(0.05, 0.4)
    return (1 - blend) * image + blend * noise


#: One painter per kind of image; image ``i`` is drawn by painter ``i mod len``.
PAINTERS: tuple[Callable[[np.random.Generator, int, int], np.ndarray], ...] = (
    _gradient,
    _discs,
    _rectangles,
    _stripes,
    _texture,
)


def calibration_images(
    count: int,
    block: int,
    *,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    seed: int = DEFAULT_SEED,
) -> list[np.ndarray]:
    """``count`` uint8 RGB images [H, W, 3], H and W multiples of ``block``, within the pixel bounds.

    Image ``i`` depends only on ``(seed, i)``: the list is the same bytes on every call and
    a longer list begins with a shorter one.
    """
    images = []
    for index in range(count):
        rows, cols = fit_blocks(*BLOCK_SHAPES[index % len(BLOCK_SHAPES)], block, min_pixels, max_pixels)
        rng = np.random.default_rng([seed, index])
        painted = PAINTERS[index % len(PAINTERS)](rng, rows * block, cols * block)
        images.append(np.round(np.clip(painted, 0, 1) * 255).astype(np.uint8))
    return images


def image_patches(image: np.ndarray, dims: VisionDims, processing: ImageProcessing) -> tuple[np.ndarray, Grid]:
    """One RGB image [H, W, 3] -> the tower's input patches [hw, C*T*P*P] (float32) and its grid (t, h, w).

    Rescaled and normalized as the processor does it; a still image is its frame repeated
    ``temporal_patch_size`` times.
    """
    pixels = image.astype(np.float32) * np.float32(processing.rescale_factor)
    normalized = (pixels - np.asarray(processing.mean, np.float32)) / np.asarray(processing.std, np.float32)
    frame = normalized.transpose(2, 0, 1)  # [C, H, W]
    frames = np.repeat(frame[None], dims.temporal_patch_size, axis=0)
    return patchify(frames, dims)


def calibration_tiles(checkpoint: Path, side: int, count: int, seed: int = DEFAULT_SEED) -> np.ndarray:
    """``count`` generated S x S images as a tiled tower's input [count, 3, S, S] (float32), normalized as the
    checkpoint's processor normalizes its tiles."""
    processing = read_image_processing(checkpoint)
    area = side * side
    tiles = []
    for image in calibration_images(count, side, min_pixels=area, max_pixels=area, seed=seed):
        pixels = image.astype(np.float32) * np.float32(processing.rescale_factor)
        normalized = (pixels - np.asarray(processing.mean, np.float32)) / np.asarray(processing.std, np.float32)
        tiles.append(normalized.transpose(2, 0, 1))
    return np.stack(tiles)
