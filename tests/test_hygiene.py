"""Linters as tests, so CI enforces them: ruff, snakefmt and snakemake --lint."""

import subprocess

from .support import BIN, REPO, run_snakemake, tool_env


def run(*command):
    return subprocess.run(command, cwd=REPO, env=tool_env(), capture_output=True, text=True)


def test_ruff_check():
    result = run(str(BIN / "ruff"), "check", ".")
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_format():
    result = run(str(BIN / "ruff"), "format", "--check", ".")
    assert result.returncode == 0, result.stdout + result.stderr


def test_snakefmt():
    result = run(str(BIN / "snakefmt"), "--check", "Snakefile", "rules/")
    assert result.returncode == 0, result.stdout + result.stderr


def test_snakemake_lint(tmp_path):
    (tmp_path / "config.yaml").write_text((REPO / "config/config.yaml").read_text())
    result = run_snakemake(tmp_path, "--lint", check=False)
    assert result.returncode == 0, result.output
    assert "Congratulations" in result.output


def test_planning_imports_no_heavy_stack():
    """The workflow package runs at every plan: it must not pull in torch, transformers, onnx or ModelOpt."""
    probe = (
        "import sys, edgellm_steps.workflow.planning, edgellm_steps.workflow.step_code;"
        "print(sorted(m for m in ('torch', 'transformers', 'onnx', 'modelopt') if m in sys.modules))"
    )
    result = run(str(BIN / "python"), "-c", probe)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_rules_reach_their_step_in_one_hop():
    """Each rule's command names a module in edgellm_steps/cli/, which calls one step module."""
    from edgellm_steps.workflow.step_code import PACKAGE_DIR, STEP_ENTRY_POINTS

    for step, module in STEP_ENTRY_POINTS.items():
        cli = PACKAGE_DIR.joinpath(*module.split(".")[1:]).with_suffix(".py")
        assert cli.parent.name == "cli" and cli.is_file(), step
