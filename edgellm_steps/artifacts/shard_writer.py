"""A safetensors checkpoint written a group of tensors at a time, so no more than one group is ever in memory.

The layout is the one ``save_pretrained`` writes for a large model: ``model-0000k-of-0000n.safetensors``
shards and ``model.safetensors.index.json`` mapping every tensor to its shard (or a single
``model.safetensors`` when everything fits one shard). Shards are written under provisional names and
renamed once their number is known. Each shard is hashed as it is written, so the step's manifest does not
read the checkpoint again.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from edgellm_steps.artifacts.safetensors_io import write_safetensors

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"


class ShardWriter:
    """Collects tensors into shards of at most ``max_shard_bytes`` (a tensor larger than that gets its own)."""

    def __init__(self, directory: Path, max_shard_bytes: int = 1 << 30) -> None:
        self.directory = directory
        self.max_shard_bytes = max_shard_bytes
        self._pending: dict[str, Any] = {}
        self._pending_bytes = 0
        self._written: list[tuple[Path, list[str]]] = []
        self._total = 0

    def add(self, name: str, tensor: Any) -> None:
        """Queue ``tensor`` (a CPU tensor) under ``name``; a shard is written as soon as it is full, so a tensor as
        large as a shard is written at once rather than held."""
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
