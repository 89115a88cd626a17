"""Content digests and source stamps: the staleness mechanism below Snakemake."""

import hashlib
import json
import os
from pathlib import Path

import huggingface_hub
import huggingface_hub.constants
import pytest

from edgellm_steps.artifacts import digests
from edgellm_steps.artifacts.atomic import staged_directory
from edgellm_steps.artifacts.claims import claim_path
from edgellm_steps.artifacts.digests import DigestCache, file_digest
from edgellm_steps.artifacts.sources import STAMP_SUFFIX, refresh_stamps
from edgellm_steps.workflow.planning import Planner, load_workflow_config


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
    # Nothing but the destination and its claim file (edgellm_steps.artifacts.claims) is left beside it.
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([claim_path(destination).name, "llm"])
    with staged_directory(destination) as staging:
        (staging / "model.onnx").write_text("whole")
    # The step owns its destination: a success replaces it whole (tests/test_staging.py has the details).
    assert [p.name for p in destination.iterdir()] == ["model.onnx"]
    assert (destination / "model.onnx").read_text() == "whole"


HUB_ID = "some-org/tiny-model"
REV1 = "0123456789abcdef0123456789abcdef01234567"
REV2 = "89abcdef0123456789abcdef0123456789abcdef"


def blob_name(name: str, data: bytes) -> str:
    """huggingface_hub's blob name: the sha256 of an LFS file (weights), the git blob sha1 of any other."""
    if name.endswith(".safetensors"):
        return hashlib.sha256(data).hexdigest()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def add_hub_snapshot(cache, repo_id: str, revision: str, files: dict[str, bytes]):
    """Lay ``files`` out in an HF hub cache the way huggingface_hub downloads them and point refs/main there.

    ``models--org--name/blobs/<hash>`` holds the bytes; ``snapshots/<revision>/<file>`` is a relative
    symlink to the blob; a file two revisions share is one blob.
    """
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / revision
    for name, data in files.items():
        blob = repo / "blobs" / blob_name(name, data)
        blob.parent.mkdir(parents=True, exist_ok=True)
        if not blob.exists():
            blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
    return snapshot


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads the environment once, at import; this process imported it already.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)
    return cache


def plan_sources(state_dir):
    """What one planning run does for the model's source: a fresh Planner, as Snakemake builds one per DAG."""
    config = load_workflow_config({"models": {"tiny": {"source": HUB_ID}}})
    planner = Planner(config, state_dir=state_dir)
    stamps = [Path(p) for p in planner.facts.model("tiny").source_stamps]
    return planner.facts.model("tiny").checkpoint.path, {p.name.removesuffix(STAMP_SUFFIX): p for p in stamps}


def stamp_state(stamps):
    return {name: (p.read_text().strip(), p.stat().st_mtime_ns) for name, p in stamps.items()}


def test_hub_cache_snapshot_of_symlinks_is_resolved_and_stamped_by_content(
    tmp_path, hub_cache, checkpoint_factory, monkeypatch
):
    source = checkpoint_factory("qwen2")
    files = {p.name: p.read_bytes() for p in sorted(source.iterdir()) if p.is_file()}
    snapshot1 = add_hub_snapshot(hub_cache, HUB_ID, REV1, files)
    # The layout is one huggingface_hub itself reads back as a cached repo with its revision and files.
    info = huggingface_hub.scan_cache_dir(hub_cache)
    assert not info.warnings
    [repo] = info.repos
    [revision] = repo.revisions
    assert (repo.repo_id, revision.commit_hash, set(revision.refs)) == (HUB_ID, REV1, {"main"})
    assert {f.file_name for f in revision.files} == set(files)
    weights = snapshot1 / "model.safetensors"
    assert weights.is_symlink() and os.readlink(weights).startswith("../../blobs/")

    state = tmp_path / ".edgellm"
    checkpoint, stamps = plan_sources(state)
    assert checkpoint == snapshot1
    assert sorted(stamps) == sorted(files)
    for name, stamp in stamps.items():
        assert stamp.read_text().strip() == digests.bytes_digest(files[name]), name
    before = stamp_state(stamps)

    # Re-planning an unchanged cache reads no file and moves no stamp.
    hashed = []
    real_file_digest = digests.file_digest
    monkeypatch.setattr(digests, "file_digest", lambda p: hashed.append(p.name) or real_file_digest(p))
    assert stamp_state(plan_sources(state)[1]) == before and hashed == []

    # A new revision that changes config.json and shares every other blob: refs/main moves, the planner
    # follows it, only config.json's new blob is read and only its stamp moves.
    config = json.loads(files["config.json"])
    config["edgellm_test_revision"] = 2
    files2 = {**files, "config.json": json.dumps(config).encode()}
    snapshot2 = add_hub_snapshot(hub_cache, HUB_ID, REV2, files2)
    checkpoint, stamps = plan_sources(state)
    assert checkpoint == snapshot2
    after = stamp_state(stamps)
    assert after["config.json"][0] == digests.bytes_digest(files2["config.json"]) != before["config.json"][0]
    assert without(after, "config.json") == without(before, "config.json")
    assert hashed == [(snapshot2 / "config.json").resolve().name]

    # A blob whose bytes change in place (same size, same name) moves the stamp of the file linking to it, only.
    hashed.clear()
    blob = (snapshot2 / "model.safetensors").resolve()
    assert blob == weights.resolve()  # the revisions share it
    data = bytearray(blob.read_bytes())
    data[-10] ^= 0xFF
    blob.write_bytes(bytes(data))
    _, stamps = plan_sources(state)
    latest = stamp_state(stamps)
    assert latest["model.safetensors"][0] == digests.bytes_digest(bytes(data)) != after["model.safetensors"][0]
    assert without(latest, "model.safetensors") == without(after, "model.safetensors")
    assert hashed == [blob.name]


def without(state: dict, name: str) -> dict:
    return {k: v for k, v in state.items() if k != name}
