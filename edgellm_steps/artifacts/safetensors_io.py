"""Reading and writing safetensors files by byte range.

The format is an 8-byte little-endian header length, a JSON header mapping each
tensor to its dtype, shape and ``data_offsets``, then the raw data. A tensor is read
by byte range: a small one with a positioned read into a fresh buffer, a large one
mapped (copy-on-write) for its own lifetime only, so the kernel's page cache is used
in place, without zeroing a buffer and copying into it, and a reader's resident
memory is still the size of what it holds (the whole file is never mapped: every
touched page of a mapped 16 GB checkpoint would count as resident). Writing streams
chunks, so a large table is never held twice.

A checkpoint is untrusted data (a download, a colleague's directory), so the
header is validated completely when a file is opened: every later read may
then trust an entry's dtype, shape and byte range, and a damaged file fails
with one line naming it instead of a traceback from deep inside a step.
"""

from __future__ import annotations

import json
import mmap
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgellm_steps.artifacts.heap import release_free_memory
from edgellm_steps.artifacts.streamed_file import StreamedFile
from edgellm_steps.errors import SourceError

if TYPE_CHECKING:
    import torch

#: Bytes per element of each safetensors dtype; the header is checked with these alone, so opening a
#: file (planning reads adapter headers) needs no torch. Tensors become torch tensors when read.
DTYPE_SIZES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
}
#: safetensors dtype name -> the name of its torch dtype (an attribute of ``torch``).
TORCH_DTYPE_NAMES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}
_NUMPY_NAMES = {np.dtype(np.float16): "F16", np.dtype(np.float32): "F32", np.dtype(np.int32): "I32"}
_SAFETENSORS_NAMES = {torch_name: name for name, torch_name in TORCH_DTYPE_NAMES.items()}
#: The safetensors format's dtypes in the order of its own ``Dtype`` enumeration (those above only): the
#: library writes tensors in the reverse of this order, then by name.
DTYPE_ORDER = ("BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "I16", "F16", "BF16", "I32", "F32", "F64", "I64")

#: Tensors at least this large are mapped from the file rather than read into a buffer.
MAP_BYTES = 1 << 20

#: Reads at least this large first hand the allocator's free memory back to the system (an LM head of
#: 1 GB would otherwise come on top of what the layers before left free but held).
LARGE_READ_BYTES = 256 << 20

#: The safetensors library's own cap on the JSON header; checked before the header is read,
#: so a corrupt length prefix (say 2**40) fails at once instead of asking for that much memory.
MAX_HEADER_BYTES = 100_000_000


@dataclass(frozen=True)
class _Entry:
    """One tensor's validated header entry; ``begin``/``end`` are offsets into the data section."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


def _invalid(path: Path, problem: str) -> SourceError:
    return SourceError(f"{path} is not a valid safetensors file: {problem}; re-download it")


def _short(value: Any, limit: int = 80) -> str:
    """``repr`` of a header value, cut short: a hostile header must not produce a megabyte error line."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_int(value: Any) -> bool:
    """A JSON integer: ``bool`` is an ``int`` subclass in Python but ``true`` is no offset."""
    return isinstance(value, int) and not isinstance(value, bool)


def _read_header(path: Path) -> tuple[int, dict[str, Any], int]:
    """The header length, the parsed header object and the file size; nothing is trusted yet."""
    try:
        with open(path, "rb") as handle:
            size = handle.seek(0, 2)
            handle.seek(0)
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise _invalid(path, f"it is {size} bytes long, shorter than the 8-byte header length")
            (length,) = struct.unpack("<Q", prefix)
            if length > MAX_HEADER_BYTES:
                raise _invalid(path, f"its header length {length} is above the {MAX_HEADER_BYTES}-byte limit")
            if 8 + length > size:
                raise _invalid(path, f"its header length {length} runs past the end of the {size}-byte file")
            raw = handle.read(length)
    except OSError as err:
        raise SourceError(
            f"{path} cannot be read ({err.strerror or err}); check that it exists and is readable"
        ) from err
    try:
        header = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise _invalid(path, f"its header is not UTF-8 ({err.reason} at byte {err.start})") from err
    except ValueError as err:  # JSONDecodeError, or an integer literal past Python's digit limit
        raise _invalid(path, f"its header is not valid JSON ({err})") from err
    except RecursionError as err:
        raise _invalid(path, "its header is JSON nested too deeply to be a tensor table") from err
    if not isinstance(header, dict):
        raise _invalid(path, f"its header is a JSON {type(header).__name__}, not an object")
    return length, header, size


def _check_metadata(path: Path, metadata: Any) -> None:
    """``__metadata__`` is a string-to-string map; nothing here reads it, but a malformed one means damage."""
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _invalid(path, "its __metadata__ is not an object of strings")


def _byte_count(shape: list[int], itemsize: int) -> int | None:
    """``prod(shape) * itemsize``, or None past 2**64 bytes: a hostile shape must not cost a bignum."""
    if 0 in shape:
        return 0
    count = itemsize
    for dim in shape:
        count *= dim
        if count > 2**64:
            return None
    return count


def _check_entry(path: Path, name: str, entry: Any) -> _Entry:
    """One tensor's entry, checked so that its byte range holds exactly its dtype and shape."""
    where = f"tensor {_short(name)}"
    if not isinstance(entry, dict):
        raise _invalid(path, f"{where} has a JSON {type(entry).__name__} entry, not an object")
    dtype = entry.get("dtype")
    if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
        raise SourceError(
            f"{path}: {where} has unsupported dtype {_short(dtype)} (supported: {', '.join(DTYPE_SIZES)}); "
            "re-save the checkpoint in one of them"
        )
    shape = entry.get("shape")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise _invalid(path, f"{where} has shape {_short(shape)}, not a list of non-negative integers")
    offsets = entry.get("data_offsets")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
        raise _invalid(path, f"{where} has data_offsets {_short(offsets)}, not a list of two integers")
    begin, end = offsets
    if not 0 <= begin <= end:
        raise _invalid(path, f"{where} has data_offsets [{begin}, {end}], not 0 <= begin <= end")
    span = end - begin
    expected = _byte_count(shape, DTYPE_SIZES[dtype])
    if expected != span:
        needs = "more than 2**64 bytes" if expected is None else f"{expected} bytes"
        raise _invalid(path, f"{where} spans {span} bytes but its shape {_short(shape)} of {dtype} needs {needs}")
    return _Entry(dtype, tuple(shape), begin, end)


def _check_layout(path: Path, entries: dict[str, _Entry], data_size: int) -> None:
    """Byte ranges ascend without overlapping and end within the file: no tensor reads another's bytes."""
    covered_to, covered_by = 0, ""
    for name, entry in sorted(entries.items(), key=lambda item: (item[1].begin, item[1].end)):
        if entry.begin < covered_to and entry.end > entry.begin:
            raise _invalid(
                path,
                f"tensors {_short(covered_by)} and {_short(name)} overlap "
                f"(data bytes {entry.begin}..{min(entry.end, covered_to)})",
            )
        if entry.end > covered_to:
            covered_to, covered_by = entry.end, name
    if covered_to > data_size:
        raise _invalid(
            path,
            f"it is truncated: tensor {_short(covered_by)} ends at data byte {covered_to} "
            f"but the file holds only {data_size} data bytes",
        )


class SafetensorsFile:
    """One safetensors file; the header is validated on open, tensors are read with positioned reads on demand."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        length, header, size = _read_header(self.path)
        metadata = header.pop("__metadata__", None)
        if metadata is not None:
            _check_metadata(self.path, metadata)
        #: The header's ``__metadata__`` (strings), or None: a step that rewrites the file keeps it.
        self.metadata: dict[str, str] | None = metadata
        self._entries = {name: _check_entry(self.path, name, entry) for name, entry in header.items()}
        self._data_start = 8 + length
        _check_layout(self.path, self._entries, size - self._data_start)

    def names(self) -> list[str]:
        return list(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name].shape

    def dtype(self, name: str) -> str:
        """The tensor's safetensors dtype name (``F16``, ``I64``, ...)."""
        return self._entries[name].dtype

    def nbytes(self, name: str) -> int:
        entry = self._entries[name]
        return entry.end - entry.begin

    def offset(self, name: str) -> int:
        """Where the tensor's bytes begin in the data section: reading tensors in this order reads the file forward."""
        return self._entries[name].begin

    def read_array(self, name: str) -> np.ndarray:
        """A tensor of a dtype numpy has (not BF16 or FP8) as a numpy array, without importing torch."""
        entry = self._entries[name]
        numpy_name = TORCH_DTYPE_NAMES[entry.dtype]
        if numpy_name in ("bfloat16", "float8_e4m3fn", "float8_e5m2"):
            raise SourceError(f"{self.path}: tensor {_short(name)} is {entry.dtype}, which numpy cannot hold")
        data = self._read(entry.begin, entry.end - entry.begin)
        return np.frombuffer(data, dtype=np.dtype(numpy_name)).reshape(entry.shape)

    def mapped_array(self, name: str) -> np.ndarray:
        """A numpy-typed tensor mapped read-only from the file: indexing it reads only the rows it touches (an
        embedding table looked up for a few tokens)."""
        entry = self._entries[name]
        numpy_name = TORCH_DTYPE_NAMES[entry.dtype]
        if numpy_name in ("bfloat16", "float8_e4m3fn", "float8_e5m2"):
            raise SourceError(f"{self.path}: tensor {_short(name)} is {entry.dtype}, which numpy cannot hold")
        offset = self._data_start + entry.begin
        return np.memmap(self.path, dtype=np.dtype(numpy_name), mode="r", offset=offset, shape=entry.shape)

    def _read(self, offset: int, size: int) -> np.ndarray:
        if size >= LARGE_READ_BYTES:
            release_free_memory()
        # np.empty, not bytearray: the buffer is filled by the read, and zeroing it first would cost as much again.
        buffer = np.empty(size, dtype=np.uint8)
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

    def _tensor(self, entry: _Entry, begin: int, end: int, shape: tuple[int, ...]) -> torch.Tensor:
        import torch

        dtype = getattr(torch, TORCH_DTYPE_NAMES[entry.dtype])
        if end == begin:
            return torch.empty(shape, dtype=dtype)
        size = end - begin
        data = self._map(begin, size) if size >= MAP_BYTES else self._read(begin, size)
        return torch.frombuffer(data, dtype=dtype).reshape(shape)

    def _map(self, offset: int, size: int) -> memoryview:
        """``size`` bytes at data ``offset``, mapped copy-on-write (a write changes the caller's copy, never the file).

        The mapping lives as long as the tensors viewing it. The kernel is asked to read it ahead at once, so
        that a cold file streams from the disk while the caller works on what came before.
        """
        if size >= LARGE_READ_BYTES:
            release_free_memory()
        start = self._data_start + offset
        aligned = start - start % mmap.ALLOCATIONGRANULARITY
        with open(self.path, "rb") as handle:
            mapped = mmap.mmap(handle.fileno(), start - aligned + size, offset=aligned, access=mmap.ACCESS_COPY)
        mapped.madvise(mmap.MADV_WILLNEED)
        return memoryview(mapped)[start - aligned :]

    def read(self, name: str) -> torch.Tensor:
        entry = self._entries[name]
        return self._tensor(entry, entry.begin, entry.end, entry.shape)

    def read_row_chunks(self, name: str, rows: int) -> Iterator[torch.Tensor]:
        entry = self._entries[name]
        shape = entry.shape
        row_bytes = (entry.end - entry.begin) // max(shape[0], 1)
        for first in range(0, shape[0], rows):
            count = min(rows, shape[0] - first)
            start = entry.begin + first * row_bytes
            yield self._tensor(entry, start, start + count * row_bytes, (count, *shape[1:]))


def safetensors_dtype(dtype: torch.dtype) -> str:
    """The safetensors name (``BF16``, ``F32``, ...) of a torch dtype."""
    return _SAFETENSORS_NAMES[str(dtype).removeprefix("torch.")]


def encoded_header(header: dict[str, Any]) -> bytes:
    """A safetensors header as the library writes it: the length, then compact JSON padded with spaces to 8 bytes."""
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    return struct.pack("<Q", len(encoded)) + encoded


def write_single_tensor(
    path: Path,
    name: str,
    shape: tuple[int, ...],
    dtype: np.dtype,
    chunks: Iterable[np.ndarray | Callable[[], np.ndarray]],
    *,
    threads: int = 1,
) -> None:
    """Write a safetensors file holding one tensor whose data arrives as row-major chunks.

    A chunk may be a conversion still to run; with ``threads`` > 1 they run on that many threads and
    the file is written behind the caller (:class:`~edgellm_steps.artifacts.streamed_file.StreamedFile`,
    which also records the file's digest for the manifest).
    """
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    encoded = encoded_header({name: {"dtype": _NUMPY_NAMES[dtype], "shape": list(shape), "data_offsets": [0, nbytes]}})

    def typed(data: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(data, dtype=dtype)

    with StreamedFile(path, threads=threads) as out:
        out.write(encoded)
        for chunk in chunks:
            out.write((lambda convert=chunk: typed(convert())) if callable(chunk) else typed(chunk))
    written = out.bytes_written - len(encoded)
    if written != nbytes:
        raise ValueError(f"{path}: wrote {written} bytes of tensor {name!r}, expected {nbytes}")


def write_safetensors(path: Path, tensors: Mapping[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` as one safetensors file, hashing the bytes as they are written (for the manifest).

    The layout is the safetensors library's, byte for byte: the tensors ordered by dtype (:data:`DTYPE_ORDER`,
    last first: largest elements first, so each begins aligned), then by name; the header padded with
    spaces to 8 bytes.
    """
    import torch

    def order(item: tuple[str, torch.Tensor]) -> tuple[int, str]:
        return (-DTYPE_ORDER.index(safetensors_dtype(item[1].dtype)), item[0])

    ordered = sorted(tensors.items(), key=order)
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, tensor in ordered:
        size = tensor.numel() * tensor.element_size()
        dtype = safetensors_dtype(tensor.dtype)
        header[name] = {"dtype": dtype, "shape": list(tensor.shape), "data_offsets": [offset, offset + size]}
        offset += size
    with StreamedFile(path) as out:
        out.write(encoded_header(header))
        for _, tensor in ordered:
            if tensor.numel():
                out.write(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
