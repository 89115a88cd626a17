"""Tensors held in memory, answering like a checkpoint's :class:`~edgellm_steps.artifacts.checkpoint.TensorStore`.

The graph builders read weights through ``get`` / ``in`` / ``names`` / ``shape`` /
``row_chunks``. A :class:`MemoryStore` offers the same for tensors that are not in
safetensors shards: calibrated quantizer tensors laid over a checkpoint (fp8 vision
export), or a small draft checkpoint read with torch's weights-only loader.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch

from edgellm_steps.errors import SourceError


class MemoryStore:
    """``tensors`` first, then ``fallback`` (another store) for names they lack."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], fallback: Any = None, *, where: str = "memory") -> None:
        self.tensors = dict(tensors)
        self.fallback = fallback
        self.where = where

    def __contains__(self, name: str) -> bool:
        return name in self.tensors or (self.fallback is not None and name in self.fallback)

    def names(self) -> list[str]:
        """The fallback's names, then those only held here."""
        below = self.fallback.names() if self.fallback is not None else []
        present = set(below)
        return below + [name for name in self.tensors if name not in present]

    def _missing(self, name: str) -> SourceError:
        return SourceError(f"{self.where}: tensor {name!r} is missing; is the checkpoint whole?")

    def shape(self, name: str) -> tuple[int, ...]:
        if name in self.tensors:
            return tuple(self.tensors[name].shape)
        if self.fallback is None:
            raise self._missing(name)
        return self.fallback.shape(name)

    def get(self, name: str) -> torch.Tensor:
        if name in self.tensors:
            return self.tensors[name]
        if self.fallback is None:
            raise self._missing(name)
        return self.fallback.get(name)

    def row_chunks(self, name: str, rows: int) -> Iterator[torch.Tensor]:
        if name in self.tensors:
            return iter(self.tensors[name].split(rows))
        if self.fallback is None:
            raise self._missing(name)
        return self.fallback.row_chunks(name, rows)

    def read_ahead(self, prefix: str) -> None:
        """The fallback's read-ahead (the tensors held here need none): a decoder graph names each next layer."""
        if self.fallback is not None:
            self.fallback.read_ahead(prefix)
