"""The workflow through real Snakemake runs: staleness by content, targets, work directories, hub ids."""

from __future__ import annotations

import json
import os
import shutil
import time

import pytest

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
    write_config,
)

pytestmark = pytest.mark.workflow


@pytest.fixture(scope="module")
def sharded_checkpoint(checkpoint_factory):
    """A qwen2 checkpoint in two ~8 MB shards: far above Snakemake's 1 MB checksum limit."""
    ckpt = checkpoint_factory("qwen2", hidden_size=512, intermediate_size=2048, max_shard_size="10MB")
    shards = sorted(ckpt.glob("*.safetensors"))
    assert len(shards) >= 2 and all(s.stat().st_size > 4_000_000 for s in shards)
    return ckpt


@pytest.fixture(scope="module")
def built_once(tmp_path_factory, sharded_checkpoint):
    """A work directory whose ONNX export was built by Snakemake, once for the module."""
    workdir = tmp_path_factory.mktemp("built")
    copy_checkpoint(sharded_checkpoint, workdir / "ckpt")
    write_config(workdir, CONFIG)
    run_snakemake(workdir, ONNX)
    assert not [path for path in workdir.rglob("*") if path.is_symlink()]  # so that a copy is a work directory
    return workdir


@pytest.fixture
def built(tmp_path, built_once):
    """A work directory whose ONNX export has just been built: a copy of ``built_once`` with its times, Snakemake's
    records and the source stamps included, so each test changes its own."""
    shutil.copytree(built_once, tmp_path, dirs_exist_ok=True)
    return tmp_path


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
    write_config(tmp_path, scenario("one_model", model="tiny", source="some-org/tiny-model"))
    run_snakemake(tmp_path, ONNX)
    assert (tmp_path / MANIFEST).is_file()
    assert NOTHING in run_snakemake(tmp_path, "-n", ONNX).output
