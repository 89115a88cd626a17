"""How the runtime lays out a Phi-4-multimodal image's rows for the language model (contract 7.4).

An image resized to ``rows x cols`` crops of 448 x 448 reaches the vision engine as ``1 + rows * cols``
blocks: the global view (the whole image at 448 x 448) first, then the crops row-major. Each block gives a
16 x 16 grid of projected rows. The language model then sees, per image:

- the crops' grids joined into one ``16 rows x 16 cols`` grid, each of its rows followed by ``sub_GN``;
- ``glb_GN``;
- the global view's 16 x 16 grid, each row followed by ``sub_GN``.

That is ``16 rows (16 cols + 1) + 1 + 16 (16 + 1)`` image tokens, each placeholder of the prompt taking one in
order (the runtime's ``vocab_size + k`` ids). Written from the contract text and tested against transformers'
``Phi4MultimodalImageEmbedding``; the separators come from the export's ``phi4mm_gn_proj.safetensors``.
"""

from __future__ import annotations

import numpy as np

#: A block's grid side (448 / 14 patches, pooled 2 x 2).
GRID = 16


def image_tokens(rows: int, cols: int) -> int:
    """Image tokens of an image of ``rows x cols`` crops (with its global view and separators)."""
    return GRID * rows * (GRID * cols + 1) + 1 + GRID * (GRID + 1)


def with_row_separators(grid: np.ndarray, sub: np.ndarray) -> np.ndarray:
    """[h, w, H] -> [h * (w + 1), H]: each row of the grid followed by ``sub``."""
    h, _, width = grid.shape
    separators = np.broadcast_to(sub.reshape(1, 1, width), (h, 1, width))
    return np.concatenate([grid, separators], axis=1).reshape(-1, width)


def image_rows(blocks: np.ndarray, rows: int, cols: int, glb: np.ndarray, sub: np.ndarray) -> np.ndarray:
    """One image's rows in the language model's order, from its vision ``output`` rows [(1 + rows*cols) * 256, H]."""
    width = blocks.shape[-1]
    grids = blocks.reshape(1 + rows * cols, GRID, GRID, width)
    crops = grids[1:].reshape(rows, cols, GRID, GRID, width).transpose(0, 2, 1, 3, 4)
    hd = crops.reshape(rows * GRID, cols * GRID, width)
    glb = np.asarray(glb, blocks.dtype).reshape(1, width)
    return np.concatenate([with_row_separators(hd, sub), glb, with_row_separators(grids[0], sub)])
