"""Large outputs written around the page cache (``O_DIRECT``), from one reused, page-aligned buffer.

A buffered write copies every byte into freshly allocated page-cache pages, and that kernel work
costs as much CPU as converting the weights: measured here, 1.2-4.2 s of system time per 1.9 GB
written (the high end right after the cache was dropped), against 0.4 s with ``O_DIRECT``. An export
writes as many bytes as it reads, and nothing reads its output back soon (the engine build runs
later, often elsewhere), so caching it only evicts what the user had cached.

``O_DIRECT`` wants the buffer address, the file offset and the length aligned to the device's block
size: data is gathered in a page-aligned buffer of :data:`BLOCK_BYTES` and written a whole buffer at
a time; the last, unaligned bytes are written with ``O_DIRECT`` turned off. Where the file system
refuses ``O_DIRECT`` (tmpfs, some network file systems) or refuses a write, the file carries on
buffered: the same bytes either way. ``EDGELLM_DIRECT_IO=0`` in the environment writes buffered always.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import mmap
import os
from pathlib import Path
from typing import Protocol

log = logging.getLogger(__name__)

#: Bytes gathered per direct write: large enough that one synchronous write keeps the disk busy.
BLOCK_BYTES = 16 << 20
#: Offsets and lengths of direct writes are multiples of this (a page; every common block size divides it).
ALIGN = 4096
#: Set to ``0`` in the environment, O_DIRECT is not tried (a file system that accepts it but misbehaves).
DIRECT_IO_VARIABLE = "EDGELLM_DIRECT_IO"


class OutputFile(Protocol):
    def write(self, data: memoryview, /) -> None: ...
    def close(self) -> None:
        """Write everything and close."""

    def discard(self) -> None:
        """Close, leaving whatever was written (for a failed step's staging to remove)."""


class CachedFile:
    """The buffered fallback, with the same three methods."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._handle = open(path, "wb")  # noqa: SIM115 - closed by close() / discard()

    def write(self, data: memoryview) -> None:
        self._handle.write(data)

    def close(self) -> None:
        self._handle.close()

    def discard(self) -> None:
        with contextlib.suppress(OSError):  # a failed flush: the file is being given up anyway
            self._handle.close()


class UncachedFile:
    """A file opened with ``O_DIRECT`` and written through an aligned staging buffer (see the module doc)."""

    def __init__(self, fd: int, path: Path) -> None:
        self._fd, self.path = fd, path
        self._block = BLOCK_BYTES
        self._buffer = mmap.mmap(-1, self._block)  # anonymous maps are page-aligned
        self._staging = memoryview(self._buffer)
        self._filled = 0
        self.direct = True

    def write(self, data: memoryview) -> None:
        """Append ``data``: a flat byte view, as the streamed file hands over."""
        taken = 0
        while taken < data.nbytes:
            count = min(self._block - self._filled, data.nbytes - taken)
            self._staging[self._filled : self._filled + count] = data[taken : taken + count]
            self._filled += count
            taken += count
            if self._filled == self._block:
                self._write_all(self._staging)
                self._filled = 0

    def _buffered(self, reason: str) -> None:
        """Carry on without O_DIRECT (the same bytes, through the page cache)."""
        if self.direct:
            log.debug("%s: writing through the page cache from here on (%s)", self.path, reason)
            flags = fcntl.fcntl(self._fd, fcntl.F_GETFL)
            fcntl.fcntl(self._fd, fcntl.F_SETFL, flags & ~os.O_DIRECT)
            self.direct = False

    def _write_all(self, view: memoryview) -> None:
        while view.nbytes:
            try:
                written = os.write(self._fd, view)
            except OSError as err:
                if err.errno != errno.EINVAL or not self.direct:
                    raise
                self._buffered("the file system refused a direct write")
                continue
            if written < view.nbytes:  # what is left is no longer aligned
                self._buffered("a short write")
            view = view[written:]

    def close(self) -> None:
        """Write what is gathered (its unaligned end buffered) and close."""
        try:
            aligned = self._filled - self._filled % ALIGN
            self._write_all(self._staging[:aligned])
            if self._filled > aligned:
                self._buffered("the unaligned end of the file")
                self._write_all(self._staging[aligned : self._filled])
            self._filled = 0
        finally:
            self.discard()

    def discard(self) -> None:
        """Close without writing what is gathered."""
        if self._fd < 0:
            return
        os.close(self._fd)
        self._fd = -1
        self._staging.release()
        self._buffer.close()


def open_output(path: Path) -> OutputFile:
    """``path`` created (or emptied) for writing: uncached where the file system allows, else buffered."""
    if hasattr(os, "O_DIRECT") and os.environ.get(DIRECT_IO_VARIABLE, "1") != "0":
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT | os.O_CLOEXEC, 0o666)
        except OSError as err:
            if err.errno != errno.EINVAL:
                raise
            log.debug("%s: the file system refuses O_DIRECT; writing through the page cache", path)
        else:
            return UncachedFile(fd, Path(path))
    return CachedFile(Path(path))
