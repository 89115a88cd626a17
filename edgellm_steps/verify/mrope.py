"""MRoPE position ids and the rope table the Edge-LLM runtime feeds a Qwen-VL language model.

The exported language model graph takes no position ids: rotary embedding comes in as
``rope_rotary_cos_sin`` [B, capacity, rot], row p holding cos | sin of the token in cache
slot p. For a vision-language model the runtime fills that table from three position
components per token (temporal, height, width; multimodal RoPE): text tokens advance all
three together, an image's tokens spread over its merged patch grid. Each rotary frequency
takes its angle from one component, chosen by the config's ``mrope_section``.

This module rebuilds that table independently of the exporter and of transformers, so the
end-to-end tests can check both against transformers' own ``get_rope_index`` and rotary
module, and drive the exported graph with image embeddings spliced in as the runtime does.
Images only: videos (whose temporal index Qwen2.5-VL scales by ``tokens_per_second``) are
not handled.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

Grid = tuple[int, int, int]


def mrope_positions(
    input_ids: Sequence[int],
    grids: Sequence[Grid],
    *,
    vision_start_id: int,
    merge_size: int,
    length: int | None = None,
) -> np.ndarray:
    """[3, length] int64 (temporal, height, width) position of every token of one sequence.

    ``input_ids`` is the prompt with each image already expanded to ``vision_start``, its
    (t*h*w)/merge_size^2 image-pad tokens and ``vision_end``; ``grids`` are the images'
    (t, h, w) patch grids in prompt order. Text (including each ``vision_start``) advances
    all three components by one per token. An image's tokens, in merge-block order, take
    (t, h', w') offsets from the position after its ``vision_start``; the text after the image
    resumes past the largest grid extent, so positions stay compact however many tokens
    the image has. Tokens beyond the prompt (generated ones, up to ``length``, which
    defaults to the prompt length) continue the text numbering: the runtime fills the table
    up to the cache capacity before decoding.
    """
    ids = np.asarray(input_ids, dtype=np.int64)
    total = len(ids) if length is None else int(length)
    if total < len(ids):
        raise ValueError(f"length {total} is shorter than the prompt ({len(ids)} tokens)")
    starts = np.flatnonzero(ids == vision_start_id)
    if len(starts) != len(grids):
        raise ValueError(f"{len(starts)} vision_start tokens in the prompt but {len(grids)} image grids")
    pieces: list[np.ndarray] = []
    cursor = 0  # first token not yet placed
    next_position = 0  # the position the next text token gets
    for start, (t, h, w) in zip(starts, grids, strict=True):
        if start < cursor:
            raise ValueError(f"vision_start at token {start} lies inside the previous image's tokens")
        if h % merge_size or w % merge_size:
            raise ValueError(f"image grid {(t, h, w)} is not a whole number of {merge_size} x {merge_size} blocks")
        text_len = int(start) + 1 - cursor
        pieces.append(np.broadcast_to(np.arange(text_len, dtype=np.int64) + next_position, (3, text_len)))
        next_position += text_len
        gh, gw = h // merge_size, w // merge_size
        grid = np.meshgrid(np.arange(t), np.arange(gh), np.arange(gw), indexing="ij")
        pieces.append(np.stack(grid).reshape(3, -1).astype(np.int64) + next_position)
        cursor = int(start) + 1 + t * gh * gw
        if cursor > len(ids):
            raise ValueError(f"image {(t, h, w)} needs {t * gh * gw} tokens after token {start}; the prompt ends")
        next_position += max(t, gh, gw)
    tail = total - cursor
    pieces.append(np.broadcast_to(np.arange(tail, dtype=np.int64) + next_position, (3, tail)))
    return np.ascontiguousarray(np.concatenate(pieces, axis=1))


def mrope_components(mrope_section: Sequence[int], *, interleaved: bool = False) -> np.ndarray:
    """Which position component (0 temporal, 1 height, 2 width) each of the sum(section) frequencies reads.

    Qwen2-VL / Qwen2.5-VL: consecutive sections, T then H then W. Qwen3-VL interleaves them
    (contract 3.6): with sections [t, h, w], frequency j reads H when j % 3 == 1 and j < 3h, W when
    j % 3 == 2 and j < 3w, and T otherwise ([24, 20, 20]: T, H, W repeating up to 60, then T).
    """
    sections = [int(s) for s in mrope_section]
    if len(sections) != 3 or min(sections) < 0:
        raise ValueError(f"mrope_section must be three non-negative sizes, got {list(mrope_section)!r}")
    if not interleaved:
        return np.repeat(np.arange(3), sections)
    slot = np.arange(sum(sections))
    components = np.zeros(len(slot), dtype=np.int64)
    components[(slot % 3 == 1) & (slot < 3 * sections[1])] = 1
    components[(slot % 3 == 2) & (slot < 3 * sections[2])] = 2
    return components


def mrope_table(
    positions: np.ndarray, *, rope_theta: float, mrope_section: Sequence[int], interleaved: bool = False
) -> np.ndarray:
    """[L, rot] float32 rope table (cos | sin, rot/2 frequencies each) for positions [3, L].

    rot = 2 x sum(mrope_section). Frequency i rotates by inv_freq[i] = rope_theta^(-2i/rot)
    times one position component, chosen by :func:`mrope_components`. Angles are computed in
    float64 so the table does not depend on float32 rounding of large positions.
    """
    positions = np.asarray(positions)
    if positions.ndim != 2 or positions.shape[0] != 3:
        raise ValueError(f"positions must be [3, L], got {positions.shape}")
    component = mrope_components(mrope_section, interleaved=interleaved)  # which position row each frequency reads
    half = len(component)
    inv_freq = 1.0 / float(rope_theta) ** (np.arange(half, dtype=np.float64) * 2 / (2 * half))
    angles = positions[component].T.astype(np.float64) * inv_freq  # [L, rot/2]
    return np.concatenate([np.cos(angles), np.sin(angles)], axis=-1).astype(np.float32)


def mrope_parameters(config: Mapping[str, Any]) -> tuple[float, list[int], bool]:
    """(rope_theta, mrope_section, interleaved) from an LLM export's ``config.json``.

    export-llm writes ``rope_theta`` at the top level and the section in ``rope_scaling``
    (the spelling the runtime parses as MRoPE). The section must cover the rotary dim
    (head_dim x partial_rotary_factor), or the table would not fit the graph's input.
    """
    section = (config.get("rope_scaling") or {}).get("mrope_section")
    if not section:
        raise ValueError("the export's config has no rope_scaling.mrope_section: not an MRoPE language model")
    rotary_dim = int(config["head_dim"] * config.get("partial_rotary_factor", 1.0))
    if 2 * sum(section) != rotary_dim:
        raise ValueError(f"mrope_section {section} does not sum to half the rotary dim {rotary_dim}")
    interleaved = bool((config.get("rope_scaling") or {}).get("mrope_interleaved"))
    return float(config["rope_theta"]), [int(s) for s in section], interleaved


def export_mrope_table(onnx_dir: str | Path, positions: np.ndarray) -> np.ndarray:
    """[1, L, rot] ``rope_rotary_cos_sin`` of one sequence for the LLM export in ``onnx_dir``."""
    config = json.loads((Path(onnx_dir) / "config.json").read_text())
    theta, section, interleaved = mrope_parameters(config)
    return mrope_table(positions, rope_theta=theta, mrope_section=section, interleaved=interleaved)[None]
