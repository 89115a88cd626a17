"""The vision encoder's inputs as the Edge-LLM runtime computes them for a batch of images.

Written from the runtime's documented behaviour (contract section 7): images are packed
along one axis of patches, each image's patches in 2 x 2 merge-block order; rotary
angles are each patch's (row, column) times the inverse frequencies of base 10000;
attention masks are additive and block-diagonal (per image, or per window); window
indices list the merge units window by window. verify-onnx feeds the vision graph with
these, and the tests check them against transformers' own vision helpers.
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
    m = dims.merge_size
    for t, h, w in grids:
        hh, ww = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        order = (h // m, m, w // m, m)
        hpos = hh.reshape(order).transpose(0, 2, 1, 3).reshape(-1)
        wpos = ww.reshape(order).transpose(0, 2, 1, 3).reshape(-1)
        angles = np.concatenate([hpos[:, None] * inv_freq, wpos[:, None] * inv_freq], axis=1)
        rows.append(np.tile(angles, (t, 1)))
    return np.concatenate(rows).astype(np.float32)


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
    patches: np.ndarray, grids: Sequence[Grid], dims: VisionDims, *, windowed: bool
) -> dict[str, np.ndarray]:
    """Every input of the vision graph for ``patches`` of images with ``grids``."""
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
    return feeds
