"""Content digests of files, cached by file identity.

A digest is xxh3-128 of the file's bytes. The cache maps a file's identity
(device, inode, size, mtime_ns, ctime_ns) to its digest, so re-planning an unchanged
multi-GB checkpoint reads no weights, while a touched file is re-read once and
found unchanged. The inode change time is part of the identity because a program
can put mtime back (``os.utime``, ``touch -r``, ``rsync -t``, ``tar`` extraction)
after changing bytes in place; nothing but the kernel sets ctime, and any write moves it.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import xxhash

from edgellm_steps.artifacts.atomic import write_if_changed

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


#: Digests computed while files were written, by (device, inode): ``(size, mtime_ns, digest)``.
_WRITTEN: dict[tuple[int, int], tuple[int, int, str]] = {}


def remember_written(path: Path, digest: str) -> None:
    """Record ``digest`` as the content of ``path``, which this process has just written and closed.

    A step's manifest then takes the digest from here instead of reading the file again
    (:func:`written_digest`). Keyed by inode, so renaming the file (a shard named once its number is
    known, a staging directory committed) keeps the record.
    """
    stat = os.stat(path)
    _WRITTEN[(stat.st_dev, stat.st_ino)] = (stat.st_size, stat.st_mtime_ns, digest)


def written_digest(path: Path) -> str | None:
    """The digest :func:`remember_written` recorded for ``path``, if the file is still as it was then.

    Size and modification time must be unchanged: a file written again after its digest was
    recorded (even in place) is hashed again by the caller. The inode's ctime is not compared, since
    a rename moves it; the record lives only in this process, which wrote the file moments ago.
    """
    stat = os.stat(path)
    entry = _WRITTEN.get((stat.st_dev, stat.st_ino))
    if entry is None or entry[:2] != (stat.st_size, stat.st_mtime_ns):
        return None
    return entry[2]


def file_identity(stat: os.stat_result) -> list[int]:
    """What must be unchanged for a cached digest to stand: ``[dev, ino, size, mtime_ns, ctime_ns]``."""
    return [stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns]


class DigestCache:
    """A JSON file of ``{abs path: [dev, ino, size, mtime_ns, ctime_ns, digest]}``.

    An entry of any other shape (an older cache's 4-field identity, a hand-edited file) is
    not trusted: its file is hashed again and the entry rewritten.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        try:
            entries = json.loads(self.path.read_text())
        except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
            entries = {}
        self._entries: dict[str, list] = entries if isinstance(entries, dict) else {}
        self._dirty = False

    def digest(self, path: Path) -> str:
        path = Path(path).resolve()
        stat = os.stat(path)
        identity = file_identity(stat)
        entry = self._entries.get(str(path))
        if (
            isinstance(entry, list)
            and len(entry) == len(identity) + 1
            and entry[:-1] == identity
            and isinstance(entry[-1], str)
        ):
            return entry[-1]
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
