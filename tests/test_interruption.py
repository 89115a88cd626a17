"""Interrupted workflows through real Snakemake runs: nothing half-written, no orphan overwrites a rerun."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from edgellm_steps.artifacts.atomic import staging_prefix

from .support import (
    BIN,
    CONFIG,
    MANIFEST,
    NOTHING,
    ONNX,
    REPO,
    copy_checkpoint,
    planned_jobs,
    run_snakemake,
    scenario,
    tool_env,
    write_config,
)

pytestmark = pytest.mark.workflow


def _wait_for_staging_data(workdir: Path, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if list(
            (workdir / "onnx/tiny_fp16").glob(f"{staging_prefix(workdir / 'onnx/tiny_fp16/llm')}*/onnx_model.data")
        ):
            return
        if process.poll() is not None:
            raise AssertionError("the export finished before it could be interrupted")
        time.sleep(0.002)
    raise AssertionError("the export never started writing weights")


def _assert_interrupted_and_recoverable(workdir: Path, *, unlock: bool) -> None:
    assert not (workdir / MANIFEST).exists() and not (workdir / ONNX).exists()
    assert planned_jobs(run_snakemake(workdir, "-n", ONNX).output) == {"export_llm": 1}
    if unlock:
        run_snakemake(workdir, "--unlock")
    run_snakemake(workdir, "--profile", str(REPO / "profiles/local"), ONNX)
    assert NOTHING in run_snakemake(workdir, "-n", ONNX).output
    assert not list((workdir / "onnx/tiny_fp16").glob(".staging-*"))


@pytest.fixture
def big_workdir(tmp_path, checkpoint_factory):
    """A checkpoint large enough (~130 MB) that its export takes a visible time to write."""
    ckpt = checkpoint_factory("qwen2", hidden_size=1024, intermediate_size=4096, num_hidden_layers=4)
    copy_checkpoint(ckpt, tmp_path / "ckpt")
    write_config(tmp_path, CONFIG)
    return tmp_path


def _start_build(workdir: Path) -> subprocess.Popen:
    command = [str(BIN / "snakemake"), "--directory", str(workdir), "--snakefile", str(REPO / "Snakefile"), "-c1", ONNX]
    return subprocess.Popen(
        command, env=tool_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )


def test_sigkill_of_the_export_step_leaves_nothing_complete(big_workdir):
    process = _start_build(big_workdir)
    _wait_for_staging_data(big_workdir, process)
    steps = [
        p
        for p in psutil.Process(process.pid).children(recursive=True)
        if any("edgellm_steps.cli.export_llm" in part for part in p.cmdline())
    ]
    assert steps, "no export process found"
    for step in steps:
        step.send_signal(signal.SIGKILL)
    assert process.wait(timeout=60) != 0
    _assert_interrupted_and_recoverable(big_workdir, unlock=False)


def test_sigkill_of_the_whole_workflow_leaves_nothing_complete(big_workdir):
    process = _start_build(big_workdir)
    _wait_for_staging_data(big_workdir, process)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=60)
    _assert_interrupted_and_recoverable(big_workdir, unlock=True)


def _export_step(process: subprocess.Popen, timeout: float = 120) -> psutil.Process:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for child in psutil.Process(process.pid).children(recursive=True):
            with contextlib.suppress(psutil.Error):
                if "edgellm_steps.cli.export_llm" in child.cmdline():  # python itself, not its shell
                    return child
        assert process.poll() is None, "the workflow ended before its export step was seen"
        time.sleep(0.002)
    raise AssertionError("no export step started")


def test_an_orphan_of_a_killed_workflow_never_replaces_the_rerun_result(big_workdir):
    """README's recovery after Snakemake is killed: unlock, change the config, rerun.

    The killed run's export step lives on as an orphan; it is held (SIGSTOP) until the
    rerun has finished with the new settings, then released to finish last. It must not
    replace the new export, and the plan must agree with what is on disk.
    """
    process = _start_build(big_workdir)
    orphan = _export_step(process)
    orphan.suspend()
    try:
        process.kill()  # Snakemake only: its export step runs on
        process.wait(timeout=60)
        roles = {r: {"prefix": f"<{r}>", "suffix": "\n"} for r in ("system", "user", "assistant")}
        (big_workdir / "template.json").write_text(json.dumps({"roles": roles}))
        write_config(big_workdir, CONFIG + "    chat_template: template.json\n")
        run_snakemake(big_workdir, "--unlock")
        run_snakemake(big_workdir, ONNX)
    finally:
        orphan.resume()
    orphan.wait(timeout=120)
    written = json.loads((big_workdir / "onnx/tiny_fp16/llm/processed_chat_template.json").read_text())
    assert written["roles"] == roles
    assert json.loads((big_workdir / MANIFEST).read_text())["parameters"]["chat_template"] == "template.json"
    assert NOTHING in run_snakemake(big_workdir, "-n", ONNX).output
    assert not list((big_workdir / "onnx/tiny_fp16").glob(".staging-*"))


def test_sigkill_of_the_shared_calibration_loses_nothing_a_rerun_cannot_rebuild(tmp_path, checkpoint_factory):
    """The shared pass killed while it writes: no statistics, and the quantize job waiting on them never ran; the
    rerun makes both."""
    copy_checkpoint(checkpoint_factory("qwen2"), tmp_path / "ckpt")
    write_config(tmp_path, scenario("quantized"))
    target = "quantized/tiny_fp8/manifest.json"
    command = [str(BIN / "snakemake"), "--directory", str(tmp_path), "--snakefile", str(REPO / "Snakefile"), "-c1"]
    process = subprocess.Popen(
        [*command, target], env=tool_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    staging = staging_prefix(tmp_path / "calibration/tiny")
    deadline = time.monotonic() + 120
    while not list((tmp_path / "calibration").glob(f"{staging}*")):
        assert process.poll() is None, "the calibration finished before it could be interrupted"
        assert time.monotonic() < deadline, "the calibration never started"
        time.sleep(0.002)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=60)
    assert not (tmp_path / "calibration/tiny/manifest.json").exists() and not (tmp_path / "quantized").exists()
    assert planned_jobs(run_snakemake(tmp_path, "-n", target).output) == {"calibrate_llm": 1, "quantize_llm": 1}
    run_snakemake(tmp_path, "--unlock")
    run_snakemake(tmp_path, target)
    assert NOTHING in run_snakemake(tmp_path, "-n", target).output
    assert not list((tmp_path / "calibration").glob(".staging-*"))
