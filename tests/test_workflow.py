"""The workflow through real Snakemake runs: staleness by content, interruption, targets."""

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

from .conftest import BIN, REPO, copy_checkpoint, run_snakemake, tool_env, write_config

pytestmark = pytest.mark.workflow

ONNX = "onnx/tiny_fp16/llm/model.onnx"
MANIFEST = "onnx/tiny_fp16/llm/manifest.json"
NOTHING = "Nothing to be done"

CONFIG = """\
models:
  tiny:
    source: ckpt
"""


@pytest.fixture(scope="module")
def sharded_checkpoint(checkpoint_factory):
    """A qwen2 checkpoint in two ~8 MB shards: far above Snakemake's 1 MB checksum limit."""
    ckpt = checkpoint_factory("qwen2", hidden_size=512, intermediate_size=2048, max_shard_size="10MB")
    shards = sorted(ckpt.glob("*.safetensors"))
    assert len(shards) >= 2 and all(s.stat().st_size > 4_000_000 for s in shards)
    return ckpt


@pytest.fixture
def built(tmp_path, sharded_checkpoint):
    """A work directory whose ONNX export has just been built."""
    copy_checkpoint(sharded_checkpoint, tmp_path / "ckpt")
    write_config(tmp_path, CONFIG)
    run_snakemake(tmp_path, ONNX)
    return tmp_path


def planned_jobs(output: str) -> dict[str, int]:
    """The job-count table of a dry run, e.g. {'export_llm': 1}."""
    jobs, in_table = {}, False
    for line in output.splitlines():
        parts = line.split()
        if parts[:2] == ["job", "count"]:
            in_table = True
        elif in_table and len(parts) == 2 and parts[1].isdigit() and parts[0] != "total":
            jobs[parts[0]] = int(parts[1])
        elif in_table and parts[:1] == ["total"]:
            break
    return jobs


def test_build_writes_the_export_and_plans_nothing_after(built):
    manifest = json.loads((built / MANIFEST).read_text())
    assert manifest["step"] == "export-llm"
    assert (built / "logs/export_llm/tiny_fp16.log").is_file()
    assert NOTHING in run_snakemake(built, "-n", ONNX).output


def test_touching_every_source_file_plans_nothing(built):
    later = time.time() + 5
    for path in (built / "ckpt").rglob("*"):
        os.utime(path, (later, later))
    assert NOTHING in run_snakemake(built, "-n", ONNX).output


def test_moving_the_checkpoint_plans_nothing(built):
    (built / "ckpt").rename(built / "moved")
    write_config(built, CONFIG.replace("source: ckpt", "source: moved"))
    assert NOTHING in run_snakemake(built, "-n", ONNX).output


def test_one_changed_byte_in_a_shard_makes_the_export_stale(built):
    shard = sorted((built / "ckpt").glob("*.safetensors"))[-1]
    with open(shard, "r+b") as handle:
        handle.seek(-64, os.SEEK_END)
        byte = handle.read(1)
        handle.seek(-64, os.SEEK_END)
        handle.write(bytes([byte[0] ^ 0x01]))
    result = run_snakemake(built, "-n", ONNX)
    assert planned_jobs(result.output) == {"export_llm": 1}
    assert f"Updated input files: .edgellm/sources/tiny/{shard.name}.xxh3" in result.output
    run_snakemake(built, ONNX)
    assert NOTHING in run_snakemake(built, "-n", ONNX).output


def test_engine_only_config_keeps_the_onnx_and_export_config_does_not(built):
    write_config(built, CONFIG + "    build:\n      max_input_len: 2048\n    sm_targets: [110]\n")
    assert NOTHING in run_snakemake(built, "-n", ONNX).output
    engine_plan = run_snakemake(built, "-n", "engines/tiny_fp16.engine").output
    assert planned_jobs(engine_plan) == {"build_engine": 1, "link_default_engine": 1}
    assert "engines/sm110/tiny_fp16.engine" in engine_plan

    roles = {r: {"prefix": f"[{r}]", "suffix": "\n"} for r in ("system", "user", "assistant")}
    (built / "template.json").write_text(json.dumps({"roles": roles}))
    write_config(built, CONFIG + "    chat_template: template.json\n")
    result = run_snakemake(built, "-n", ONNX)
    assert planned_jobs(result.output) == {"export_llm": 1}
    reasons = [line for line in result.output.splitlines() if "reason:" in line]
    assert any("template.json" in line for line in reasons), reasons
    run_snakemake(built, ONNX)
    written = json.loads((built / "onnx/tiny_fp16/llm/processed_chat_template.json").read_text())
    assert written["roles"] == roles


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


def test_engine_targets_plan_with_gpu_resources(built):
    result = run_snakemake(built, "-n", "engines/sm87/tiny_fp16.engine")
    assert planned_jobs(result.output) == {"build_engine": 1}
    assert "gpu=1" in result.output
    default = run_snakemake(built, "-n", "engines/tiny_fp16.engine")
    assert "engines/sm87/tiny_fp16.engine" in default.output


def test_engine_job_fails_in_one_line_without_tensorrt(built):
    result = run_snakemake(built, "engines/sm87/tiny_fp16.engine", check=False)
    assert result.returncode != 0
    log = (built / "logs/build_engine/sm87/tiny_fp16.log").read_text().strip().splitlines()
    assert log[-1].startswith("error: TensorRT is not installed")
    assert not (built / "engines/sm87/tiny_fp16.engine").exists()


def test_runs_from_any_workdir_and_writes_nothing_into_the_checkout(tmp_path, sharded_checkpoint):
    def snapshot():
        return {
            str(p.relative_to(REPO)): p.stat().st_mtime_ns
            for p in REPO.rglob("*")
            if not any(part in (".git", ".venv", ".pytest_cache", ".ruff_cache", ".demo") for part in p.parts)
            and "__pycache__" not in p.parts
        }

    before = snapshot()
    work = tmp_path / "elsewhere"
    work.mkdir()
    copy_checkpoint(sharded_checkpoint, work / "ckpt")
    config = write_config(work, CONFIG)
    # `<checkout>/.venv/bin/snakemake` with an untouched PATH: the venv is neither activated nor on PATH.
    untouched = {
        **os.environ,
        "PATH": os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep) if p != str(BIN)),
    }
    run_snakemake(work, ONNX, "--configfile", str(config), env=untouched)
    assert (work / ONNX).is_file() and (work / ".edgellm").is_dir() and (work / "logs").is_dir()
    assert snapshot() == before


def test_hub_id_source_resolves_from_the_local_cache(tmp_path, checkpoint_factory, monkeypatch):
    cache = tmp_path / "hf-cache"
    repo = cache / "models--some-org--tiny-model"
    commit = "0123456789abcdef0123456789abcdef01234567"
    copy_checkpoint(checkpoint_factory("qwen2"), repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    write_config(tmp_path, "models:\n  tiny:\n    source: some-org/tiny-model\n")
    run_snakemake(tmp_path, ONNX)
    assert (tmp_path / MANIFEST).is_file()
    assert NOTHING in run_snakemake(tmp_path, "-n", ONNX).output


def test_verify_target_writes_a_passing_report(tmp_path, checkpoint_factory):
    copy_checkpoint(checkpoint_factory("qwen2"), tmp_path / "ckpt")
    write_config(tmp_path, CONFIG)
    plan = run_snakemake(tmp_path, "-n", "reports/tiny_fp16/verify.json")
    assert planned_jobs(plan.output) == {"export_llm": 1, "verify_onnx": 1}
    run_snakemake(tmp_path, "reports/tiny_fp16/verify.json")
    report = json.loads((tmp_path / "reports/tiny_fp16/verify.json").read_text())
    assert report["passed"] and report["cases"]["prefill_decode"]["greedy_match"]
    assert NOTHING in run_snakemake(tmp_path, "-n", "reports/tiny_fp16/verify.json").output


QUANT_CONFIG = """\
models:
  tiny:
    source: ckpt
    quantization:
      calib_size: 4
      calib_max_tokens: 32
      threads: 1  # tiny models: two one-thread jobs at once beat one two-thread job
"""
QUANT_PRECISIONS = (
    "fp8",
    "int8_sq",
    "int4_awq",
    "nvfp4",
    "fp8-lmfp8",
    "fp16-kvfp8",
    "int4_awq-lmfp8-kvfp8",
    "int8_sq-lmnvfp4-kvfp8",
)


def test_every_quantized_precision_builds_and_calibration_config_is_tracked(tmp_path, checkpoint_factory):
    copy_checkpoint(checkpoint_factory("qwen2", hidden_size=128, intermediate_size=256), tmp_path / "ckpt")
    write_config(tmp_path, QUANT_CONFIG)
    targets = [f"onnx/tiny_{p}/llm/model.onnx" for p in (*QUANT_PRECISIONS, "fp16")]
    plan = run_snakemake(tmp_path, "-n", *targets)
    assert planned_jobs(plan.output) == {"quantize_llm": len(QUANT_PRECISIONS), "export_llm": len(targets)}
    run_snakemake(tmp_path, *targets)
    for precision in QUANT_PRECISIONS:
        info = json.loads((tmp_path / f"quantized/tiny_{precision}/edgellm_quantization.json").read_text())
        assert info["precision"] == precision and info["calibration"]["samples"] == 4
    assert NOTHING in run_snakemake(tmp_path, "-n", *targets).output

    write_config(tmp_path, QUANT_CONFIG.replace("calib_size: 4", "calib_size: 6") + "      device: cpu\n")
    replan = run_snakemake(tmp_path, "-n", *targets)
    assert planned_jobs(replan.output) == {"quantize_llm": len(QUANT_PRECISIONS), "export_llm": len(QUANT_PRECISIONS)}
    assert "--calib_size 6" in replan.output
    write_config(tmp_path, QUANT_CONFIG + "      device: cuda\n")
    assert NOTHING in run_snakemake(tmp_path, "-n", *targets).output


def test_gptq_checkpoint_exports_without_a_quantize_job(tmp_path, checkpoint_factory):
    from .gptq_checkpoint import write_gptq_checkpoint

    write_gptq_checkpoint(
        checkpoint_factory("qwen2", hidden_size=128, intermediate_size=256), tmp_path / "ckpt", tmp_path / "float"
    )
    write_config(tmp_path, CONFIG)
    target = "onnx/tiny_int4_gptq/llm/model.onnx"
    report = "reports/tiny_int4_gptq/verify.json"
    assert planned_jobs(run_snakemake(tmp_path, "-n", target).output) == {"export_llm": 1}
    run_snakemake(tmp_path, target, report)
    # verify's reference is the float model holding the dequantized GPTQ weights: no GPTQ kernel package.
    summary = json.loads((tmp_path / report).read_text())
    assert summary["passed"] and summary["precision"] == "int4_gptq"
    assert all(case["greedy_match"] for case in summary["cases"].values())
    assert json.loads((tmp_path / "onnx/tiny_int4_gptq/llm/manifest.json").read_text())["parameters"]["precision"] == (
        "int4_gptq"
    )
    refused = run_snakemake(tmp_path, "-n", ONNX, check=False)
    assert refused.returncode != 0 and "request precision int4_gptq" in refused.output
