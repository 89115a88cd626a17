"""A safetensors checkpoint written a group of tensors at a time, so no more than one group is ever in memory.

The layout is the one ``save_pretrained`` writes for a large model: ``model-0000k-of-0000n.safetensors``
shards and ``model.safetensors.index.json`` mapping every tensor to its shard (or a single
``model.safetensors`` when everything fits one shard). Shards are written under provisional names and
renamed once their number is known. Each shard is hashed as it is written, so the step's manifest does not
read the checkpoint again.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from edgellm_steps.artifacts.heap import release_free_memory
from edgellm_steps.artifacts.safetensors_io import (
    TORCH_DTYPE_NAMES,
    encoded_header,
    safetensors_dtype,
    write_safetensors,
)
from edgellm_steps.artifacts.streamed_file import StreamedFile

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"


#: Elements of a tensor narrowed and compared at a time (16 MiB of float32), so the check holds no second
#: full-size copy.
NARROW_ELEMENTS = 1 << 22


def narrowing(tensor: Any, stored: str | None) -> Any:
    """The float dtype ``stored`` (a safetensors name) when it holds every value of float ``tensor`` exactly and
    differs from its dtype, else None.

    A step that computes in float32 (calibration on the CPU) would otherwise write a bf16 source's weights it
    never changed at twice their size, for every later step to read. A tensor the step changed (a smoothed
    weight) keeps the step's dtype unless its new values happen to fit: either way nothing is rounded.
    """
    import torch

    target = getattr(torch, TORCH_DTYPE_NAMES.get(stored or "", ""), None)
    if not isinstance(target, torch.dtype) or not target.is_floating_point or not tensor.is_floating_point():
        return None
    if target == tensor.dtype:
        return None
    fits = all(torch.equal(part.to(tensor.dtype), whole) for part, whole in _narrowed(tensor, target))
    return target if fits else None


def _narrowed(tensor: Any, target: Any) -> Iterator[tuple[Any, Any]]:
    """(slice in ``target``, the same slice of ``tensor``), row-major, :data:`NARROW_ELEMENTS` at a time."""
    flat = tensor.reshape(-1)
    for start in range(0, flat.numel(), NARROW_ELEMENTS):
        part = flat[start : start + NARROW_ELEMENTS]
        yield part.to(target), part


def as_stored(tensor: Any, stored: str | None) -> Any:
    """``tensor`` in the dtype ``stored`` when :func:`narrowing` allows it, else as it is."""
    target = narrowing(tensor, stored)
    return tensor if target is None else _narrowed_copy(tensor, target)


def _narrowed_copy(tensor: Any, target: Any) -> Any:
    """``tensor`` in ``target``, which :func:`narrowing` has found to hold its values."""
    import torch

    narrowed = torch.empty(tensor.shape, dtype=target)
    flat, start = narrowed.view(-1), 0
    for part, _ in _narrowed(tensor, target):
        flat[start : start + len(part)] = part
        start += len(part)
    return narrowed


def write_narrowed(path: Path, name: str, tensor: Any, target: Any) -> int:
    """Write ``tensor`` alone, in ``target``, as :func:`write_safetensors` writes it, a slice at a time (no narrowed
    copy of it is ever whole); returns the bytes of tensor data."""
    import torch

    nbytes = tensor.numel() * target.itemsize
    entry = {"dtype": safetensors_dtype(target), "shape": list(tensor.shape), "data_offsets": [0, nbytes]}
    with StreamedFile(path) as out:
        out.write(encoded_header({"__metadata__": {"format": "pt"}, name: entry}))
        for part, _ in _narrowed(tensor, target):
            out.write(part.view(torch.uint8).numpy())
    return nbytes


class ShardWriter:
    """Collects tensors into shards of at most ``max_shard_bytes`` (a tensor larger than that gets its own, and so
    does one narrowed to its stored dtype that fills half a shard: it is narrowed as it is written)."""

    def __init__(
        self, directory: Path, max_shard_bytes: int = 1 << 30, *, stored_dtypes: Mapping[str, str] | None = None
    ) -> None:
        """``stored_dtypes``: tensor name -> its safetensors dtype in the step's source; a tensor whose values that
        dtype holds exactly is written in it (:func:`as_stored`)."""
        self.directory = directory
        self.max_shard_bytes = max_shard_bytes
        self.stored_dtypes = dict(stored_dtypes or {})
        self._pending: dict[str, Any] = {}
        self._pending_bytes = 0
        self._written: list[tuple[Path, list[str]]] = []
        self._total = 0

    def add(self, name: str, tensor: Any) -> None:
        """Queue ``tensor`` (a CPU tensor) under ``name``; a shard is written as soon as it is full, so a tensor as
        large as a shard is written at once rather than held."""
        target = narrowing(tensor, self.stored_dtypes.get(name))
        if target is not None and tensor.numel() * target.itemsize >= self.max_shard_bytes // 2:
            self._write_alone(name, tensor, target)  # a shard of its own, narrowed as it is written
            return
        tensor = _narrowed_copy(tensor, target) if target is not None else tensor
        size = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + size > self.max_shard_bytes:
            self.flush()
        if name in self._pending or any(name in names for _, names in self._written):
            raise ValueError(f"tensor {name} written twice")
        self._pending[name] = tensor.detach().contiguous().cpu()
        self._pending_bytes += size
        self._total += size
        if self._pending_bytes >= self.max_shard_bytes:
            self.flush()

    def _write_alone(self, name: str, tensor: Any, target: Any) -> None:
        self.flush()
        if any(name in names for _, names in self._written):
            raise ValueError(f"tensor {name} written twice")
        path = self.directory / f".shard-{len(self._written):05d}.safetensors"
        self._total += write_narrowed(path, name, tensor, target)
        self._written.append((path, [name]))

    def end_group(self) -> None:
        """A group of tensors (a model layer) is complete: write what is queued when it is a sizable part of a
        shard, so the next group is not read while this one is held; small groups keep accumulating (a small
        model stays one file)."""
        if self._pending_bytes >= self.max_shard_bytes // 4:
            self.flush()

    def flush(self) -> None:
        """Write the queued tensors as one shard."""
        if not self._pending:
            return
        path = self.directory / f".shard-{len(self._written):05d}.safetensors"
        write_safetensors(path, self._pending, metadata={"format": "pt"})
        self._written.append((path, sorted(self._pending)))
        self._pending, self._pending_bytes = {}, 0
        release_free_memory()  # the shard's and its conversions' freed buffers would otherwise pile up in the heap

    def close(self) -> list[Path]:
        """Write what is queued, name the shards, and write the index when there is more than one."""
        self.flush()
        count = len(self._written)
        if count == 1:
            final = self.directory / SINGLE
            self._written[0][0].rename(final)
            return [final]
        files, weight_map = [], {}
        for number, (path, names) in enumerate(self._written, start=1):
            final = self.directory / f"model-{number:05d}-of-{count:05d}.safetensors"
            path.rename(final)
            files.append(final)
            weight_map.update(dict.fromkeys(names, final.name))
        index = {"metadata": {"total_size": self._total}, "weight_map": dict(sorted(weight_map.items()))}
        (self.directory / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        return files
