"""The digest cache's file identity: what it takes for a cached digest to stand."""

import json
import os
import time

from edgellm_steps.artifacts import digests
from edgellm_steps.artifacts.digests import DigestCache, file_digest


def edit_in_place_keeping_mtime(path, offset: int) -> None:
    """Flip one byte without changing the size, then put atime and mtime back as they were."""
    before = os.stat(path)
    # Let the kernel's (coarse) clock move on, so the edit gets a ctime of its own.
    time.sleep(0.05)
    with open(path, "r+b") as handle:
        handle.seek(offset)
        byte = handle.read(1)
        handle.seek(offset)
        handle.write(bytes([byte[0] ^ 0xFF]))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = os.stat(path)
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (before.st_ino, before.st_size, before.st_mtime_ns)
    assert after.st_ctime_ns != before.st_ctime_ns


def test_in_place_edit_with_restored_mtime_is_seen(tmp_path):
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(os.urandom(1 << 16))
    cache = DigestCache(tmp_path / "cache.json")
    first = cache.digest(weights)
    cache.save()

    edit_in_place_keeping_mtime(weights, 1000)

    assert first != file_digest(weights)
    assert cache.digest(weights) == file_digest(weights)  # the cache in memory
    assert DigestCache(tmp_path / "cache.json").digest(weights) == file_digest(weights)  # and the one on disk


def test_old_and_malformed_cache_entries_are_hashed_again(tmp_path):
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(os.urandom(4096))
    other = tmp_path / "tokenizer.json"
    other.write_text("{}")
    stat = os.stat(weights)
    stale = "0" * 32
    # The 4-field identity an older cache wrote, matching the file exactly, with a digest that is wrong.
    old_entry = [stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stale]
    cache_file = tmp_path / "cache.json"
    cache_file.write_text(json.dumps({str(weights.resolve()): old_entry, str(other.resolve()): "not a list"}))

    cache = DigestCache(cache_file)
    assert cache.digest(weights) == file_digest(weights) != stale
    assert cache.digest(other) == file_digest(other)
    cache.save()
    entries = json.loads(cache_file.read_text())
    assert entries[str(weights.resolve())] == [*digests.file_identity(os.stat(weights)), file_digest(weights)]

    for text in ("[1, 2, 3]", "not json", ""):
        cache_file.write_text(text)
        assert DigestCache(cache_file).digest(weights) == file_digest(weights)
