"""Image resizing as the two sides of an InternVL comparison do it: transformers' PIL bicubic, and an
approximation of the Edge-LLM runtime's stb_image_resize2 (see :mod:`edgellm_steps.verify.internvl_tiles`).

Each resampler takes uint8 (H, W, 3) pixels and returns them resized to (height, width), uint8.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import numpy as np


def _resize_pil(pixels: np.ndarray, height: int, width: int) -> np.ndarray:
    """PIL's bicubic resize of (H, W, 3) uint8, the call transformers' PIL processor makes.

    Pillow is imported here, not at module load: it comes with matplotlib (pinned in
    constraints.txt) and only this resampler needs it.
    """
    from PIL import Image

    return np.asarray(Image.fromarray(pixels).resize((width, height), resample=Image.Resampling.BICUBIC))


def catmull_rom(x: np.ndarray) -> np.ndarray:
    """Catmull-Rom cubic (Keys, a = -0.5): stb's upsampling filter and PIL's bicubic."""
    return _cubic(x, b=0.0, c=0.5)


def mitchell(x: np.ndarray) -> np.ndarray:
    """Mitchell-Netravali cubic with B = C = 1/3: stb's downsampling filter."""
    return _cubic(x, b=1 / 3, c=1 / 3)


def _cubic(x: np.ndarray, *, b: float, c: float) -> np.ndarray:
    """The (B, C) family of cubic filters, support [-2, 2]."""
    x = np.abs(x)
    near = ((12 - 9 * b - 6 * c) * x**3 + (-18 + 12 * b + 6 * c) * x**2 + (6 - 2 * b)) / 6
    far = ((-b - 6 * c) * x**3 + (6 * b + 30 * c) * x**2 + (-12 * b - 48 * c) * x + (8 * b + 24 * c)) / 6
    return np.where(x < 1, near, np.where(x < 2, far, 0.0))


def resample_taps(
    source: int, target: int, kernel: Callable[[np.ndarray], np.ndarray], *, edge: Literal["clamp", "trim"] = "clamp"
) -> tuple[np.ndarray, np.ndarray]:
    """Source indices and weights ([target, taps] each) of a separable resize along one axis; rows sum to 1.

    Pixel centers sit at i + 0.5; output pixel i samples the source at (i + 0.5) * source / target.
    Shrinking stretches the kernel by source / target (antialiasing), as stb and PIL both do.
    ``clamp`` gives taps beyond the border to the edge pixel (stb's STBIR_EDGE_CLAMP); ``trim``
    drops them (PIL); each row is then renormalized.
    """
    if edge not in ("clamp", "trim"):
        raise ValueError(f"edge {edge!r}: expected 'clamp' or 'trim'")
    stretch = max(source / target, 1.0)
    centers = (np.arange(target) + 0.5) * (source / target)
    reach = int(np.ceil(2 * stretch)) + 1
    taps = np.floor(centers).astype(np.int64)[:, None] + np.arange(-reach, reach + 1)[None, :]
    weights = kernel((taps + 0.5 - centers[:, None]) / stretch)
    if edge == "trim":
        weights = np.where((taps >= 0) & (taps < source), weights, 0.0)
    return np.clip(taps, 0, source - 1), weights / weights.sum(axis=1, keepdims=True)


def resize_separable(
    pixels: np.ndarray,
    height: int,
    width: int,
    *,
    kernels: tuple[Callable[[np.ndarray], np.ndarray], Callable[[np.ndarray], np.ndarray]],
    edge: Literal["clamp", "trim"] = "clamp",
    round_between: bool = False,
) -> np.ndarray:
    """(H, W, 3) uint8 resized with one kernel per axis (vertical, horizontal), in float32, rounded half up.

    The horizontal pass runs first. ``round_between`` rounds and clips its result to uint8 before
    the vertical pass, as PIL does; stb keeps floats between the passes.
    """
    data = pixels.astype(np.float32)
    index, weight = resample_taps(pixels.shape[1], width, kernels[1], edge=edge)
    weight = weight.astype(np.float32)
    across = sum(weight[None, :, k, None] * data[:, index[:, k], :] for k in range(index.shape[1]))
    if round_between:
        across = np.clip(np.floor(across + 0.5), 0, 255)
    index, weight = resample_taps(pixels.shape[0], height, kernels[0], edge=edge)
    weight = weight.astype(np.float32)
    out = sum(weight[:, k, None, None] * across[index[:, k], :, :] for k in range(index.shape[1]))
    return np.clip(np.floor(out + 0.5), 0, 255).astype(np.uint8)


def _resize_stb(pixels: np.ndarray, height: int, width: int) -> np.ndarray:
    """An approximation of ``stbir_resize_uint8_linear``.

    Catmull-Rom along an axis that grows or keeps its size, Mitchell along one that shrinks.
    """
    kernels = (
        catmull_rom if height >= pixels.shape[0] else mitchell,
        catmull_rom if width >= pixels.shape[1] else mitchell,
    )
    return resize_separable(pixels, height, width, kernels=kernels, edge="clamp")


RESAMPLERS: dict[str, Callable[[np.ndarray, int, int], np.ndarray]] = {"pil": _resize_pil, "stb": _resize_stb}
