"""Content digests of files, cached by file identity.

A digest is xxh3-128 of the file's bytes. The cache maps a file's identity
(device, inode, size, mtime_ns) to its digest, so re-planning an unchanged
multi-GB checkpoint reads no weights, while a touched file is re-read once and
found unchanged.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import xxhash

from edgellm_steps.atomic import write_if_changed

log = logging.getLogger(__name__)

_CHUNK = 8 << 20


def file_digest(path: Path) -> str:
    """xxh3-128 of a file's content, as 32 hex digits."""
    hasher = xxhash.xxh3_128()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            hasher.update(chunk)
    return hasher.hexdigest()


def bytes_digest(data: bytes) -> str:
    return xxhash.xxh3_128_hexdigest(data)


class DigestCache:
    """A JSON file of ``{abs path: [dev, ino, size, mtime_ns, digest]}``."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        try:
            self._entries: dict[str, list] = json.loads(self.path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            self._entries = {}
        self._dirty = False

    def digest(self, path: Path) -> str:
        path = Path(path).resolve()
        stat = os.stat(path)
        identity = [stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns]
        entry = self._entries.get(str(path))
        if entry is not None and entry[:4] == identity:
            return entry[4]
        log.debug("hashing %s (%d bytes)", path, stat.st_size)
        digest = file_digest(path)
        self._entries[str(path)] = [*identity, digest]
        self._dirty = True
        return digest

    def save(self) -> None:
        if self._dirty:
            data = json.dumps(self._entries, sort_keys=True, indent=0).encode()
            write_if_changed(self.path, data)
            self._dirty = False
