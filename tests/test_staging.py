"""Staging and commit: per destination, whole directories in one rename, only the newest run commits."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from edgellm_steps.artifacts.atomic import (
    claim_file,
    current_umask,
    staged_directory,
    staging_prefix,
    write_claimed,
    write_if_changed,
)
from edgellm_steps.artifacts.claims import SupersededError, claim_path, process_start_ns, take_claim
from edgellm_steps.errors import EdgeLLMError


def test_a_job_started_while_another_is_midway_does_not_disturb_it(tmp_path):
    """The second job's cleanup runs while the first one is staging; both finish."""
    first, second = tmp_path / "fp8", tmp_path / "fp8-kvfp8"  # one name a prefix of the other
    with staged_directory(first) as staging_one:
        (staging_one / "a.bin").write_text("first")
        with staged_directory(second) as staging_two:
            (staging_two / "b.bin").write_text("second")
        assert staging_one.is_dir(), "the sibling job removed a live staging directory"
        (staging_one / "manifest.json").write_text("{}")
    assert (first / "a.bin").read_text() == "first" and (first / "manifest.json").is_file()
    assert (second / "b.bin").read_text() == "second"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".staging")]


def test_two_jobs_in_one_parent_at_once(tmp_path):
    """Two threads stage side by side, each cleaning up as it starts; both results land whole."""
    barrier = threading.Barrier(2, timeout=10)
    errors: list[BaseException] = []

    def job(name: str) -> None:
        try:
            with staged_directory(tmp_path / name) as staging:
                (staging / "part").write_text(name)
                barrier.wait()  # both are mid-way here
                (staging / "manifest.json").write_text(name)
                barrier.wait()
        except BaseException as err:  # reported below, in the test's thread
            errors.append(err)

    threads = [threading.Thread(target=job, args=(name,)) for name in ("sm87", "sm87-b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    for name in ("sm87", "sm87-b"):
        assert (tmp_path / name / "part").read_text() == name == (tmp_path / name / "manifest.json").read_text()


def test_only_the_destinations_own_leftovers_are_removed(tmp_path):
    own = tmp_path / f"{staging_prefix(tmp_path / 'llm')}killed"
    sibling = tmp_path / f"{staging_prefix(tmp_path / 'llm-2')}live"
    own.mkdir()
    sibling.mkdir()
    with staged_directory(tmp_path / "llm") as staging:
        (staging / "manifest.json").write_text("{}")
    assert not own.exists() and sibling.is_dir()


def test_the_destination_is_replaced_whole(tmp_path):
    """No file of the earlier run survives, and the new content arrives as one directory."""
    destination = tmp_path / "llm"
    destination.mkdir()
    (destination / "old-shard.bin").write_text("old")
    (destination / "model.onnx").write_text("old")
    with staged_directory(destination) as staging:
        (staging / "model.onnx").write_text("new")
        (staging / "manifest.json").write_text("{}")
        assert (destination / "old-shard.bin").is_file(), "the destination changed before the commit"
    assert sorted(p.name for p in destination.iterdir()) == ["manifest.json", "model.onnx"]
    assert (destination / "model.onnx").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == [claim_path(destination).name, "llm"]


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077], ids=["022", "002", "077"])
def test_committed_outputs_have_the_modes_the_umask_gives_not_the_staging_names_private_ones(tmp_path, umask):
    """On a shared cluster a group-readable umask must give group-readable engines and exports.

    Control: the staging names alone (``mkdtemp`` 0700, ``mkstemp`` 0600) fail the 0o022 and 0o002 cases.
    """
    previous = os.umask(umask)
    try:
        assert current_umask() == umask
        with staged_directory(tmp_path / "llm") as staging:
            (staging / "model.onnx").write_text("graph")
        claim = claim_file(tmp_path / "llm" / "lora_model.onnx")
        write_claimed(claim, b"lora graph")
        write_if_changed(tmp_path / "config.yaml", b"models: {}")
    finally:
        os.umask(previous)
    modes = {
        path.name: path.stat().st_mode & 0o777
        for path in (tmp_path / "llm", tmp_path / "llm" / "lora_model.onnx", tmp_path / "config.yaml")
    }
    assert modes == {"llm": 0o777 & ~umask, "lora_model.onnx": 0o666 & ~umask, "config.yaml": 0o666 & ~umask}


def test_a_failed_run_leaves_the_destination_as_it_was(tmp_path):
    destination = tmp_path / "llm"
    destination.mkdir()
    (destination / "model.onnx").write_text("old")
    with pytest.raises(RuntimeError), staged_directory(destination) as staging:
        (staging / "model.onnx").write_text("half")
        raise RuntimeError("killed midway")
    assert [p.name for p in destination.iterdir()] == ["model.onnx"]
    assert (destination / "model.onnx").read_text() == "old"


def test_process_start_time_is_the_kernels_not_the_clock_now():
    started = process_start_ns()
    time.sleep(0.05)
    assert process_start_ns() == started
    assert abs(started / 1e9 - _python_start_time()) < 2.0


def _python_start_time() -> float:
    import psutil

    return psutil.Process().create_time()


RUN = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from edgellm_steps.artifacts.atomic import staged_directory
    from edgellm_steps.artifacts.claims import SupersededError
    destination, label, gate, mode = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3]), sys.argv[4]
    stage_first = mode in ("stage-first", "write-after-newer")

    def wait():
        while not gate.exists():
            time.sleep(0.01)

    try:
        if not stage_first:
            wait()
        with staged_directory(destination) as staging:
            (staging / "result").write_text(label)
            if stage_first:
                (destination.parent / f"{label}.staged").write_text("")
                wait()
                if mode == "write-after-newer":  # its staging directory is gone by now
                    (staging / "late").write_text(label)
    except SupersededError as err:
        print(err)
        sys.exit(3)
    """
)


def _start(destination: Path, label: str, gate: Path, mode: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", RUN, str(destination), label, str(gate), mode],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


@pytest.mark.parametrize("mode", ["stage-first", "claim-late", "write-after-newer"])
def test_an_orphan_never_replaces_a_newer_runs_result(tmp_path, mode):
    """The older run is held (mid-staging, or before it even claimed) while a newer run commits.

    Released, it finds the newer claim and exits without touching the destination; also when it
    goes on writing into the staging directory that the newer run removed as a leftover.
    """
    destination, gate = tmp_path / "quantized", tmp_path / "go"
    orphan = _start(destination, "old-settings", gate, mode)
    if mode != "claim-late":
        deadline = time.monotonic() + 60
        while not (tmp_path / "old-settings.staged").exists():
            assert orphan.poll() is None and time.monotonic() < deadline, orphan.communicate()[0]
            time.sleep(0.01)
    else:
        time.sleep(0.05)  # the orphan process has started; it claims only once released
    newer = _start(destination, "new-settings", tmp_path / "newer-needs-no-gate", "claim-late")
    (tmp_path / "newer-needs-no-gate").write_text("")
    assert newer.wait(timeout=60) == 0, newer.communicate()[0]
    assert (destination / "result").read_text() == "new-settings"
    gate.write_text("")
    output = orphan.communicate(timeout=60)[0]
    assert orphan.returncode == 3, output
    assert "now belongs to a run started later" in output
    assert (destination / "result").read_text() == "new-settings"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".staging")]


def test_a_claimed_file_is_not_written_by_a_superseded_run(tmp_path):
    report = tmp_path / "verify.json"
    claim = take_claim(report)
    assert write_claimed(claim, b"first")
    claim_path(report).write_text(f"{claim.started_ns + 1} elsewhere 1")  # a run that started later
    with pytest.raises(SupersededError):
        write_claimed(claim, b"stale")
    assert report.read_bytes() == b"first"
    with pytest.raises(SupersededError):
        take_claim(report)
    os.unlink(claim_path(report))
    assert write_claimed(take_claim(report), b"again")


def test_a_claimed_file_is_staged_beside_it_and_a_killed_runs_staging_goes_at_the_next_claim(tmp_path):
    """A file written into a directory another step owns (insert-lora's graph in an export) stages under a name
    unique to it, so the next run's claim removes what a killed run left, and only that."""
    destination = tmp_path / "lora_model.onnx"
    killed = tmp_path / f"{staging_prefix(destination)}killed"
    sibling = tmp_path / f"{staging_prefix(tmp_path / 'lora_model.onnx.bak')}live"
    killed.write_bytes(b"half")
    sibling.write_bytes(b"another destination's")
    claim = claim_file(destination)
    assert not killed.exists() and sibling.exists()
    assert write_claimed(claim, b"graph")
    mtime = destination.stat().st_mtime_ns
    assert not write_claimed(claim, b"graph") and destination.stat().st_mtime_ns == mtime  # unchanged: left alone
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [claim_path(destination).name, destination.name, sibling.name]
    )


def _write_text(staging: Path) -> None:
    (staging / "config.json").write_text("{}")


def _torch_save(staging: Path) -> None:
    import torch

    torch.save({"state": 1}, staging / "modelopt_state.pth")


def _save_safetensors(staging: Path) -> None:
    import torch
    from safetensors.torch import save_file

    save_file({"weight": torch.zeros(2)}, str(staging / "model.safetensors"))


#: How steps write into their staging directory; each fails its own way once the directory is gone.
WRITERS = {"pathlib": _write_text, "torch.save": _torch_save, "safetensors": _save_safetensors}


@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_a_run_whose_staging_a_later_run_removed_reports_superseded(tmp_path, writer):
    """A later-started run claims the destination and removes this run's staging midway through its writes.

    The next write fails on the missing directory (FileNotFoundError, torch's RuntimeError, a
    SafetensorError); the run must report the takeover in one line, not that error's traceback.
    """
    destination = tmp_path / "quantized"
    with (
        pytest.raises(SupersededError, match="now belongs to a run started later") as raised,
        staged_directory(destination) as staging,
    ):
        (staging / "first-shard").write_text("old-settings")
        newer = _start(destination, "new-settings", tmp_path, "claim-late")  # a later process start
        assert newer.wait(timeout=60) == 0, newer.communicate()[0]
        assert not staging.exists(), "the later run kept this run's staging: the case is not exercised"
        WRITERS[writer](staging)
    assert "\n" not in str(raised.value)
    assert (destination / "result").read_text() == "new-settings"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".staging")]


@pytest.mark.parametrize("when", ["writing", "committing"])
def test_a_staging_directory_deleted_by_someone_else_is_one_clear_error(tmp_path, when):
    """No later run claimed the destination, yet the staging vanished: an EdgeLLMError, the destination untouched."""
    destination = tmp_path / "llm"
    destination.mkdir()
    (destination / "model.onnx").write_text("old")
    with (
        pytest.raises(EdgeLLMError, match="was deleted while the run wrote into it") as raised,
        staged_directory(destination) as staging,
    ):
        (staging / "model.onnx").write_text("new")
        shutil.rmtree(staging)
        if when == "writing":
            (staging / "manifest.json").write_text("{}")
    assert not isinstance(raised.value, SupersededError)
    assert (destination / "model.onnx").read_text() == "old"
