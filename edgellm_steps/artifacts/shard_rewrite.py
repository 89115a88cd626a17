"""Rewriting a safetensors shard one tensor at a time: the few tensors a step changes, every other as stored.

dequantize-fp8 and merge-lora both turn a checkpoint into one of the same layout in which only some tensors
differ. A shard is streamed: the header is computed from the source's (the same names, in the source's data
order, the changed tensors' dtypes), then each tensor's bytes are written in turn, an unchanged one copied in
slices of rows, so the step holds a bounded part of the checkpoint whatever its size. The output is hashed
as it is written (:class:`~edgellm_steps.artifacts.streamed_file.StreamedFile`), so the manifest need not
read it again. A shard none of whose tensors change comes out byte for byte when its header is laid out as
the safetensors library writes it (compact JSON, entries in data order).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgellm_steps.artifacts.safetensors_io import DTYPE_SIZES, SafetensorsFile, encoded_header
from edgellm_steps.artifacts.streamed_file import StreamedFile

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

#: Bytes of an unchanged tensor copied per read: large tables travel in slices this size.
COPY_CHUNK_BYTES = 64 * 2**20


@dataclass(frozen=True)
class Rewritten:
    """A tensor the step changes: its output dtype (safetensors name) and its bytes, as row-major chunks.

    ``chunks`` is called when the tensor's turn comes, so a computed tensor is held only while it is written.
    """

    dtype: str
    chunks: Callable[[], Iterator[torch.Tensor]]


def copied_chunks(shard: SafetensorsFile, name: str) -> Iterator[torch.Tensor]:
    """A tensor as it is stored, in slices of rows of about :data:`COPY_CHUNK_BYTES`."""
    shape = shard.shape(name)
    if not shape or shape[0] == 0:
        yield shard.read(name)
        return
    row_bytes = math.prod(shape[1:]) * DTYPE_SIZES[shard.dtype(name)]
    yield from shard.read_row_chunks(name, max(1, COPY_CHUNK_BYTES // max(row_bytes, 1)))


def rewrite_shard(
    shard: SafetensorsFile,
    destination: Path,
    changed: Mapping[str, Rewritten],
    dropped: Collection[str] = (),
) -> int:
    """Write ``shard`` to ``destination`` without ``dropped``, ``changed`` tensors as they say; returns the data bytes.

    The shard's ``__metadata__`` is kept. A changed tensor keeps its name and shape; its chunks must add up to
    exactly its bytes in the new dtype, or the write fails (and the step with it) naming the tensor.
    """
    import torch

    names = sorted((n for n in shard.names() if n not in dropped), key=shard.offset)
    header: dict[str, Any] = {"__metadata__": shard.metadata} if shard.metadata is not None else {}
    offset = 0
    for name in names:
        dtype = changed[name].dtype if name in changed else shard.dtype(name)
        size = math.prod(shard.shape(name)) * DTYPE_SIZES[dtype]
        header[name] = {"dtype": dtype, "shape": list(shard.shape(name)), "data_offsets": [offset, offset + size]}
        offset += size
    destination.parent.mkdir(parents=True, exist_ok=True)
    with StreamedFile(destination) as handle:
        handle.write(encoded_header(header))
        for name in names:
            written = 0
            for chunk in changed[name].chunks() if name in changed else copied_chunks(shard, name):
                if chunk.numel():
                    data = chunk.contiguous().reshape(-1).view(torch.uint8).numpy()
                    handle.write(data)
                    written += data.nbytes
            begin, end = header[name]["data_offsets"]
            if written != end - begin:
                raise RuntimeError(f"{destination}: wrote {written} bytes of {name}, expected {end - begin}")
    log.info("wrote %s (%d tensors, %d changed)", destination, len(names), sum(n in changed for n in names))
    return offset
