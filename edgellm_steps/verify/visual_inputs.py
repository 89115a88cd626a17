"""The vision encoder's inputs as the Edge-LLM runtime computes them for a batch of images.

Written from the runtime's documented behaviour (contract section 7): images are packed
along one axis of patches, each image's patches in 2 x 2 merge-block order; rotary
angles are each patch's (row, column) times the inverse frequencies of base 10000;
attention masks are additive and block-diagonal (per image, or per window); window
indices list the merge units window by window; Qwen3-VL's learned position grid is
sampled bilinearly per patch (4 corner rows and weights). verify-onnx feeds the vision
graph with these, and the tests check them against transformers' own vision helpers.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from edgellm_steps.export import visual_io as io
from edgellm_steps.models.vision_geometry import RUNTIME_VISION_ROPE_THETA, Grid, VisionDims

#: Added to the scores of patch pairs that must not attend to each other.
MASKED = np.float16(np.finfo(np.float16).min)


def rotary_angles(grids: Sequence[Grid], dims: VisionDims) -> np.ndarray:
    """[hw, D/2] float32: row angles then column angles of every patch, in patch order."""
    quarter = dims.head_dim // 4
    inv_freq = 1.0 / RUNTIME_VISION_ROPE_THETA ** (np.arange(quarter, dtype=np.float64) * 2 / (dims.head_dim // 2))
    rows = []
    for t, h, w in grids:
        hpos, wpos = merge_order(h, w, dims.merge_size)
        angles = np.concatenate([hpos[:, None] * inv_freq, wpos[:, None] * inv_freq], axis=1)
        rows.append(np.tile(angles, (t, 1)))
    return np.concatenate(rows).astype(np.float32)


def merge_order(h: int, w: int, m: int) -> tuple[np.ndarray, np.ndarray]:
    """Row and column of each patch of an h x w image, in merge-block order ([h/m, w/m, m, m])."""
    hh, ww = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    order = (h // m, m, w // m, m)
    return hh.reshape(order).transpose(0, 2, 1, 3).reshape(-1), ww.reshape(order).transpose(0, 2, 1, 3).reshape(-1)


def _axis_taps(pos: np.ndarray, size: int, side: int, mode: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-axis (floor, ceil) grid rows and weights [n, 2] sampling linspace(0, side-1, size) at ``pos``.

    In float32, as transformers samples its grid; ``nearest`` (a negative control only) puts the
    whole weight on the closest row.
    """
    src = pos.astype(np.float32) * np.float32(side - 1) / np.float32(max(size - 1, 1))
    floor = np.floor(src)
    taps = np.clip(floor.astype(np.int64)[:, None] + np.arange(2), 0, side - 1)
    frac = (src - floor).astype(np.float32)
    if mode == "bilinear":
        weights = np.stack([np.float32(1) - frac, frac], axis=1)
    elif mode == "nearest":
        upper = frac >= 0.5
        weights = np.stack([~upper, upper], axis=1).astype(np.float32)
    else:
        raise ValueError(f"position sampling {mode!r} is neither bilinear nor nearest")
    return taps, weights


def position_taps(grids: Sequence[Grid], dims: VisionDims, *, mode: str = "bilinear") -> tuple[np.ndarray, np.ndarray]:
    """Qwen3-VL's learned positions: corner rows int64 [4, hw] and weights float32 [4, hw], merge-block order.

    Each image of h x w patches samples the G x G grid at linspace(0, G-1, h) x linspace(0, G-1, w);
    corner c = 2 * (row tap) + (column tap), i.e. (floor, floor), (floor, ceil), (ceil, floor), (ceil, ceil).
    Every frame of an image repeats its positions.
    """
    side = dims.position_grid
    if not side:
        raise ValueError("this vision tower has no learned position grid")
    indices, weights = [], []
    for t, h, w in grids:
        rows, cols = merge_order(h, w, dims.merge_size)
        h_taps, h_weights = _axis_taps(rows, h, side, mode)
        w_taps, w_weights = _axis_taps(cols, w, side, mode)
        index = (h_taps[:, :, None] * side + w_taps[:, None, :]).reshape(-1, 4)
        weight = (h_weights[:, :, None] * w_weights[:, None, :]).reshape(-1, 4)
        indices.append(np.tile(index, (t, 1)))
        weights.append(np.tile(weight, (t, 1)))
    return np.concatenate(indices).T.copy(), np.concatenate(weights).T.astype(np.float32)


def block_mask(lengths: Sequence[int]) -> np.ndarray:
    """[1, hw, hw] float16: 0 inside each consecutive block of ``lengths`` patches, :data:`MASKED` elsewhere."""
    total = int(sum(lengths))
    mask = np.full((1, total, total), MASKED, dtype=np.float16)
    start = 0
    for n in lengths:
        mask[0, start : start + n, start : start + n] = 0
        start += n
    return mask


def window_order(grids: Sequence[Grid], dims: VisionDims) -> tuple[np.ndarray, list[int]]:
    """Merge units listed window by window, and each window's patch count (Qwen2.5-VL)."""
    if dims.window_size is None:
        raise ValueError("this vision tower has no window attention")
    m = dims.merge_size
    span = dims.window_size // m // dims.patch_size  # merge units per window side
    index, lengths, offset = [], [], 0
    for t, h, w in grids:
        gh, gw = h // m, w // m
        for frame in range(t):
            base = offset + frame * gh * gw
            for wi in range(-(-gh // span)):
                for wj in range(-(-gw // span)):
                    units = [
                        base + r * gw + c
                        for r in range(wi * span, min(gh, (wi + 1) * span))
                        for c in range(wj * span, min(gw, (wj + 1) * span))
                    ]
                    index.extend(units)
                    lengths.append(len(units) * dims.merge_unit)
        offset += t * gh * gw
    return np.asarray(index, dtype=np.int64), lengths


def visual_feeds(
    patches: np.ndarray, grids: Sequence[Grid], dims: VisionDims, *, windowed: bool, position_mode: str = "bilinear"
) -> dict[str, np.ndarray]:
    """Every input of the vision graph for ``patches`` of images with ``grids``.

    ``position_mode`` ``nearest`` feeds a wrongly sampled position grid (Qwen3-VL): the negative
    control that shows verify-onnx notices.
    """
    feeds = {
        io.INPUT: patches.astype(np.float16),
        io.ROTARY_POS_EMB: rotary_angles(grids, dims),
        # Full attention stays within one frame (an image is one frame).
        io.ATTENTION_MASK: block_mask([h * w for t, h, w in grids for _ in range(t)]),
    }
    if windowed:
        index, lengths = window_order(grids, dims)
        feeds[io.WINDOW_ATTENTION_MASK] = block_mask(lengths)
        feeds[io.WINDOW_INDEX] = index
        feeds[io.REVERSE_WINDOW_INDEX] = np.argsort(index).astype(np.int64)
    if dims.position_grid:
        index, weight = position_taps(grids, dims, mode=position_mode)
        feeds[io.FAST_POS_EMBED_IDX] = index
        feeds[io.FAST_POS_EMBED_WEIGHT] = weight.astype(np.float16)
    return feeds
