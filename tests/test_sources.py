"""Content digests and source stamps: the staleness mechanism below Snakemake."""

import os

from edgellm_steps import digests
from edgellm_steps.atomic import staged_directory
from edgellm_steps.digests import DigestCache, file_digest
from edgellm_steps.sources import refresh_stamps


def make_tree(root):
    (root / "sub").mkdir(parents=True)
    (root / "a.bin").write_bytes(os.urandom(3000))
    (root / "sub" / "b.json").write_text("{}")
    (root / ".cache").mkdir()
    (root / ".cache" / "ignored").write_text("x")
    return root


def test_cache_hit_reads_nothing(tmp_path, monkeypatch):
    tree = make_tree(tmp_path / "ckpt")
    cache = DigestCache(tmp_path / "cache.json")
    first = cache.digest(tree / "a.bin")
    cache.save()
    calls = []
    monkeypatch.setattr(digests, "file_digest", lambda p: calls.append(p) or "x")
    again = DigestCache(tmp_path / "cache.json")
    assert again.digest(tree / "a.bin") == first and calls == []
    os.utime(tree / "a.bin", (1, 1))
    again.digest(tree / "a.bin")
    assert calls == [(tree / "a.bin").resolve()]


def test_stamps_move_only_with_content(tmp_path):
    tree = make_tree(tmp_path / "ckpt")
    stamps_dir = tmp_path / "stamps"
    cache = DigestCache(tmp_path / "cache.json")
    stamps = refresh_stamps(tree, stamps_dir, cache)
    assert sorted(p.relative_to(stamps_dir).as_posix() for p in stamps) == ["a.bin.xxh3", "sub/b.json.xxh3"]
    mtimes = {p: p.stat().st_mtime_ns for p in stamps}
    for path in tree.rglob("*"):
        os.utime(path, (12345, 12345))
    refresh_stamps(tree, stamps_dir, cache)
    assert {p: p.stat().st_mtime_ns for p in stamps} == mtimes

    data = bytearray((tree / "a.bin").read_bytes())
    data[1500] ^= 1
    (tree / "a.bin").write_bytes(bytes(data))
    refresh_stamps(tree, stamps_dir, cache)
    assert (stamps_dir / "a.bin.xxh3").read_text().strip() == file_digest(tree / "a.bin")
    assert (stamps_dir / "a.bin.xxh3").stat().st_mtime_ns != mtimes[stamps_dir / "a.bin.xxh3"]
    assert (stamps_dir / "sub/b.json.xxh3").stat().st_mtime_ns == mtimes[stamps_dir / "sub/b.json.xxh3"]

    (tree / "sub" / "b.json").unlink()
    assert [p.name for p in refresh_stamps(tree, stamps_dir, cache)] == ["a.bin.xxh3"]
    assert not (stamps_dir / "sub/b.json.xxh3").exists()


def test_failed_step_leaves_destination_untouched(tmp_path):
    destination = tmp_path / "llm"
    destination.mkdir()
    (destination / "lora_model.onnx").write_text("kept")
    try:
        with staged_directory(destination) as staging:
            (staging / "model.onnx").write_text("half")
            raise RuntimeError("killed")
    except RuntimeError:
        pass
    assert sorted(p.name for p in destination.iterdir()) == ["lora_model.onnx"]
    assert [p.name for p in tmp_path.iterdir()] == ["llm"]
    with staged_directory(destination) as staging:
        (staging / "model.onnx").write_text("whole")
    assert (destination / "model.onnx").read_text() == "whole"
    assert (destination / "lora_model.onnx").read_text() == "kept"
