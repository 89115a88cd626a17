"""Staging is per destination: jobs writing into one parent directory never disturb each other."""

from __future__ import annotations

import threading

import pytest

from edgellm_steps.atomic import staged_directory, staging_prefix


@pytest.mark.parametrize("exclusive", [False, True])
def test_a_job_started_while_another_is_midway_does_not_disturb_it(tmp_path, exclusive):
    """The second job's cleanup runs while the first one is staging; both finish."""
    first, second = tmp_path / "fp8", tmp_path / "fp8-kvfp8"  # one name a prefix of the other
    with staged_directory(first, exclusive=exclusive) as staging_one:
        (staging_one / "a.bin").write_text("first")
        with staged_directory(second, exclusive=exclusive) as staging_two:
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
