"""Linters as tests, so CI enforces them: ruff, snakefmt and snakemake --lint."""

import subprocess

from .conftest import BIN, REPO, run_snakemake, tool_env


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
