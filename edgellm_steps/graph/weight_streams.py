"""Weights as streams of converted slices, so no full-size copy of a tensor is made.

An HF Linear weight is [N, K]; the float, fp8 and int8 graph initializers are its
transpose [K, N] (MatMul layout). :func:`transposed_chunks` yields row-major slices
of that layout, converting a slice of the source at a time. Each slice is handed
over as a conversion still to run (a function of no arguments), so that a
pipelined writer can run several at once and in the background.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import partial

import numpy as np
import torch

#: Elements converted per slice (16 MB of float16): small enough that the C allocator reuses a freed
#: slice's pages for the next one (:mod:`edgellm_steps.artifacts.heap`), large enough to stream.
CHUNK_ELEMENTS = 1 << 23


def transposed_chunks(
    weight: torch.Tensor, convert: Callable[[torch.Tensor], np.ndarray]
) -> Iterator[Callable[[], np.ndarray]]:
    """Rows of ``convert(weight.T)``, a slice of input columns at a time, each as a conversion still to run.

    ``convert(part)`` receives a [k, N] view of the transposed weight: k consecutive input columns.
    """
    step = max(1, CHUNK_ELEMENTS // max(weight.shape[0], 1))
    for first in range(0, weight.shape[1], step):
        yield partial(convert, weight[:, first : first + step].t())


def _fp16_contiguous(part: torch.Tensor) -> np.ndarray:
    """``part`` ([k, N], a transposed view) in float16, row-major: the source's rows are converted first, then
    transposed, which is faster than converting along the transposed strides (same values either way)."""
    return part.t().to(torch.float16).t().contiguous().numpy()


def fp16_transposed_chunks(weight: torch.Tensor) -> Iterator[Callable[[], np.ndarray]]:
    """Rows of ``weight.T`` in float16."""
    return transposed_chunks(weight, _fp16_contiguous)
