"""Reading and writing safetensors files by byte range.

The format is an 8-byte little-endian header length, a JSON header mapping each
tensor to its dtype, shape and ``data_offsets``, then the raw data. Reading by
range (not ``mmap``) keeps a reader's resident memory at the size of what it
asked for: pages of a memory-mapped 16 GB checkpoint count as resident once
touched. Writing streams chunks, so a large table is never held twice.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

from edgellm_steps.errors import SourceError

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_NUMPY_NAMES = {np.dtype(np.float16): "F16", np.dtype(np.float32): "F32", np.dtype(np.int32): "I32"}


class SafetensorsFile:
    """One safetensors file; tensors are read with positioned reads on demand."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        try:
            with open(self.path, "rb") as handle:
                (length,) = struct.unpack("<Q", handle.read(8))
                header = json.loads(handle.read(length))
        except (struct.error, json.JSONDecodeError, UnicodeDecodeError) as err:
            raise SourceError(f"{self.path} is not a valid safetensors file ({err}); re-download it") from err
        header.pop("__metadata__", None)
        self._data_start = 8 + length
        self._entries = header

    def names(self) -> list[str]:
        return list(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entries[name]["shape"])

    def _read(self, offset: int, size: int) -> bytearray:
        buffer = bytearray(size)
        view = memoryview(buffer)
        with open(self.path, "rb", buffering=0) as handle:
            handle.seek(self._data_start + offset)
            done = 0
            while done < size:
                count = handle.readinto(view[done:])
                if not count:
                    raise SourceError(f"{self.path} is truncated; re-download it")
                done += count
        return buffer

    def _tensor(self, name: str, begin: int, end: int, shape: tuple[int, ...]) -> torch.Tensor:
        dtype = DTYPES[self._entries[name]["dtype"]]
        if end == begin:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(self._read(begin, end - begin), dtype=dtype).reshape(shape)

    def read(self, name: str) -> torch.Tensor:
        entry = self._entries[name]
        if entry["dtype"] not in DTYPES:
            raise SourceError(f"{self.path}: tensor {name!r} has unsupported dtype {entry['dtype']}")
        begin, end = entry["data_offsets"]
        return self._tensor(name, begin, end, tuple(entry["shape"]))

    def read_row_chunks(self, name: str, rows: int) -> Iterator[torch.Tensor]:
        entry = self._entries[name]
        shape = tuple(entry["shape"])
        begin, end = entry["data_offsets"]
        row_bytes = (end - begin) // max(shape[0], 1)
        for first in range(0, shape[0], rows):
            count = min(rows, shape[0] - first)
            start = begin + first * row_bytes
            yield self._tensor(name, start, start + count * row_bytes, (count, *shape[1:]))


def write_single_tensor(
    path: Path, name: str, shape: tuple[int, ...], dtype: np.dtype, chunks: Iterable[np.ndarray]
) -> None:
    """Write a safetensors file holding one tensor whose data arrives as row-major chunks."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    header = {name: {"dtype": _NUMPY_NAMES[dtype], "shape": list(shape), "data_offsets": [0, nbytes]}}
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    written = 0
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(encoded)))
        handle.write(encoded)
        for chunk in chunks:
            data = np.ascontiguousarray(chunk, dtype=dtype)
            handle.write(memoryview(data).cast("B"))
            written += data.nbytes
    if written != nbytes:
        raise ValueError(f"{path}: wrote {written} bytes of tensor {name!r}, expected {nbytes}")
