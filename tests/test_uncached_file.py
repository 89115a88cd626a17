"""Large outputs written around the page cache: the same bytes whether O_DIRECT is used, refused or off."""

from __future__ import annotations

import errno
import fcntl
import os

import numpy as np
import pytest

from edgellm_steps.artifacts import uncached_file
from edgellm_steps.artifacts.uncached_file import ALIGN, CachedFile, UncachedFile, open_output

#: Sizes around the alignment and the (shrunk) staging buffer: 1, a page less one, a page plus one...
SIZES = (1, ALIGN - 1, ALIGN + 1, 3 * ALIGN, 5, 20_000, 2 * ALIGN, 7)


def parts() -> list[bytes]:
    generator = np.random.default_rng(0)
    return [generator.integers(0, 255, size, dtype=np.uint8).tobytes() for size in SIZES]


def refuse_direct_opens(monkeypatch):
    real = os.open

    def opening(path, flags, *args, **kwargs):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "O_DIRECT refused", str(path))
        return real(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", opening)


def refuse_the_second_write(monkeypatch):
    real, calls = os.write, []

    def writing(fd, data):
        calls.append(len(data))
        if len(calls) == 2:
            raise OSError(errno.EINVAL, "direct write refused")
        return real(fd, data)

    monkeypatch.setattr(os, "write", writing)


@pytest.mark.parametrize("route", ["direct", "refused at open", "refused mid-file", "off"])
def test_an_output_writes_the_same_bytes_by_every_route(tmp_path, monkeypatch, route):
    monkeypatch.setattr(uncached_file, "BLOCK_BYTES", 2 * ALIGN)  # several direct writes, then an unaligned end
    if route == "refused at open":
        refuse_direct_opens(monkeypatch)
    if route == "off":
        monkeypatch.setenv("EDGELLM_DIRECT_IO", "0")
    path = tmp_path / "out.bin"
    out = open_output(path)
    if route in ("direct", "refused mid-file"):
        if not isinstance(out, UncachedFile):
            pytest.skip(f"{tmp_path}'s file system refuses O_DIRECT")
        assert fcntl.fcntl(out._fd, fcntl.F_GETFL) & os.O_DIRECT
        if route == "refused mid-file":
            refuse_the_second_write(monkeypatch)
    else:
        assert isinstance(out, CachedFile)
    for part in parts():
        out.write(memoryview(part))
    if isinstance(out, UncachedFile):
        assert out.direct == (route == "direct")  # a refused write goes on through the page cache
    out.close()
    assert path.read_bytes() == b"".join(parts())


def test_a_discarded_output_leaves_what_it_had_not_written_yet(tmp_path, monkeypatch):
    """Control: the byte comparison above sees a missing end (what is still gathered when a step fails)."""
    monkeypatch.setattr(uncached_file, "BLOCK_BYTES", 2 * ALIGN)
    path = tmp_path / "out.bin"
    out = open_output(path)
    for part in parts():
        out.write(memoryview(part))
    out.discard()
    written = path.read_bytes()
    assert written != b"".join(parts())
    if isinstance(out, UncachedFile):  # whole staging buffers only
        assert len(written) % (2 * ALIGN) == 0 and b"".join(parts()).startswith(written)
