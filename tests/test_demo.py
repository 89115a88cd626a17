"""The README's first command, `make demo`, run as written but into a temporary work directory."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from .support import REPO, tool_env

pytestmark = pytest.mark.workflow

EXPORT = "onnx/demo-qwen2.5-vl_fp8/llm"
VISUAL = "onnx/demo-qwen2.5-vl/visual"
#: What the workflow writes into a work directory; none of it may appear in the checkout.
WORK_DIR_ENTRIES = (".demo", ".snakemake", ".edgellm", "logs", "benchmarks", "onnx", "engines")


def snapshot(root):
    """(relative path, size, mtime_ns) of every file under ``root``; None when it does not exist."""
    if not root.exists():
        return None
    return sorted((str(p.relative_to(root)), p.lstat().st_size, p.lstat().st_mtime_ns) for p in root.rglob("*"))


def test_make_demo_builds_the_export_in_the_given_directory(tmp_path):
    make = shutil.which("make")
    if make is None:
        pytest.skip("make is not installed")
    # `make demo` first runs `make setup`, which reinstalls the venv when the pins are newer than its stamp.
    if subprocess.run([make, "-q", "-C", str(REPO), "setup"], capture_output=True).returncode != 0:
        pytest.skip("the venv is older than pyproject.toml/constraints.txt: run `make setup` first")
    before = {name: snapshot(REPO / name) for name in WORK_DIR_ENTRIES}
    demo = tmp_path / "demo"

    result = subprocess.run(
        [make, "-C", str(REPO), "demo", f"DEMO_DIR={demo}"], env=tool_env(), capture_output=True, text=True
    )

    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    export = demo / EXPORT
    assert (export / "model.onnx").is_file() and (export / "onnx_model.data").is_file()
    manifest = json.loads((export / "manifest.json").read_text())
    assert manifest["step"] == "export-llm"
    assert set(manifest["files"]) == {p.name for p in export.iterdir()} - {"manifest.json"}
    assert manifest["parameters"]["precision"] == "fp8"
    assert json.loads((demo / VISUAL / "manifest.json").read_text())["step"] == "export-visual"
    assert (demo / "checkpoints/demo-qwen2.5-vl/config.json").is_file() and (demo / "config.yaml").is_file()
    for report in ("reports/demo-qwen2.5-vl_fp8/verify.json", "reports/demo-qwen2.5-vl/visual/verify.json"):
        assert json.loads((demo / report).read_text())["passed"], report
    # The engine target is dry-run only: both engines are planned, none is built.
    assert "build_engine" in output and "build_visual_engine" in output and not (demo / "engines").exists()
    # The summary names the work directory's artifacts and the measured parity.
    assert f"language model ONNX export             {export}/" in output
    assert f"vision encoder ONNX export             {demo / VISUAL}/" in output
    assert "vision encoder vs the transformers tower         fp16: passed; one_image" in output
    # It ends with the accuracy table: the trained demo model's fp16 and fp8 exports on held-out text.
    accuracy = json.loads((demo / "reports/demo-qwen2.5-vl/accuracy.json").read_text())["precisions"]
    vocabulary = json.loads((demo / "checkpoints/demo-qwen2.5-vl/config.json").read_text())["text_config"]["vocab_size"]
    # Trained, the model predicts far better than uniformly (a random one's perplexity is about its vocabulary).
    assert list(accuracy) == ["fp16", "fp8"] and accuracy["fp16"]["perplexity"] < vocabulary / 3
    assert "Accuracy on 1016 held-out tokens" in output and "  fp8 " in output
    # Snakemake's own report of the work directory holds the accuracy page, the jobs table and the verify reports.
    html = (demo / "report.html").read_text()
    assert all(name in html for name in ("accuracy.html", "accuracy.png", "jobs.html", "verify.json")), "report"
    assert f"Snakemake's report (accuracy, jobs, verify, rule graph): {demo / 'report.html'}" in output
    assert {name: snapshot(REPO / name) for name in WORK_DIR_ENTRIES} == before, "make demo wrote into the checkout"
