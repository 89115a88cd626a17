"""A step's recorded implementation digest covers exactly the project modules its command imports."""

from __future__ import annotations

import shutil

import pytest

from edgellm_steps.workflow.step_code import PACKAGE_DIR, STEP_ENTRY_POINTS, import_closure, step_code_digest


def names(step: str) -> set[str]:
    return {p.relative_to(PACKAGE_DIR).as_posix() for p in import_closure(STEP_ENTRY_POINTS[step])}


def test_closures_follow_the_imports():
    export, quantize, verify, engine = (names(s) for s in ("export-llm", "quantize-llm", "verify-onnx", "build-engine"))
    # reached only through other modules (llm_graph -> plugins/attention; export/quantized_linear -> nvfp4) or lazily
    assert {
        "cli/export_llm.py",
        "export/llm_graph.py",
        "plugins/attention.py",
        "quant/nvfp4.py",
        "artifacts/safetensors_io.py",
    } <= export
    assert {
        "__init__.py",
        "cli/__init__.py",
        "plugins/__init__.py",
        "export/__init__.py",
        "artifacts/tokenizer_files.py",
    } <= export
    assert {"quant/calibration.py", "quant/recipes.py"} <= quantize and not {
        "quant/calibration.py",
        "quant/recipes.py",
    } & export
    assert "export/llm_graph.py" not in quantize
    assert {"verify/reference.py", "verify/reference_models.py", "verify/parity.py"} <= verify
    assert {"engine/profiles.py", "engine/limits.py"} <= engine and "export/llm_graph.py" not in engine
    assert all("workflow/planning.py" not in closure for closure in (export, quantize, verify, engine))


@pytest.fixture
def package_copy(tmp_path):
    return shutil.copytree(PACKAGE_DIR, tmp_path / "edgellm_steps", ignore=shutil.ignore_patterns("__pycache__"))


def digests(package_dir) -> dict[str, str]:
    step_code_digest.cache_clear()
    try:
        return {step: step_code_digest(step, package_dir) for step in STEP_ENTRY_POINTS}
    finally:
        step_code_digest.cache_clear()


@pytest.mark.parametrize(
    ("module", "changed"),
    [
        ("export/llm_graph.py", {"export-llm", "export-draft"}),  # the LLM and draft exports only
        # The text corpus readers.
        (
            "quant/calibration.py",
            {"calibrate-llm", "quantize-llm", "quantize-draft", "reduce-vocab", "accuracy-report"},
        ),
        # A recipe: the quantize jobs, never the shared statistics pass.
        ("quant/recipes.py", {"export-visual", "quantize-llm", "quantize-draft", "verify-onnx"}),
        ("engine/profiles.py", {"build-engine"}),
        ("verify/reference.py", {"verify-onnx", "accuracy-report"}),
        ("export/sidecars.py", {"export-llm", "export-visual", "export-draft"}),
        ("export/visual_graph.py", {"export-visual"}),  # verify-onnx reads the vision graph's I/O names only
        ("export/visual_io.py", {"export-visual", "verify-onnx", "build-engine"}),  # its I/O: graph, feeds, profiles
        (
            "quant/nvfp4.py",
            {
                "export-llm",
                "export-visual",
                "export-draft",
                "calibrate-llm",
                "quantize-llm",
                "quantize-draft",
                "verify-onnx",
                "accuracy-report",
            },
        ),
    ],
)
def test_editing_a_module_changes_exactly_the_steps_that_import_it(package_copy, module, changed):
    before = digests(package_copy)
    assert before == digests(PACKAGE_DIR)
    with open(package_copy / module, "a", encoding="utf-8") as handle:
        handle.write("\n# an edit\n")
    after = digests(package_copy)
    assert {step for step in STEP_ENTRY_POINTS if after[step] != before[step]} == changed
