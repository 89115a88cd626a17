"""Shared fixtures: tiny real checkpoints (made once per session) and a Snakemake driver."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from edgellm_steps.models.demo import make_checkpoint

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}

#: One tiny configuration per test case of the export; every family in the registry must appear.
TINY_CASES = {
    "qwen2": {"family": "qwen2"},
    "llama-tied": {"family": "llama", "tie_word_embeddings": True},
    "llama-mqa": {"family": "llama", "num_key_value_heads": 1},
    "llama3-rope": {
        "family": "llama",
        "rope_parameters": LLAMA3_ROPE,
    },
    "qwen3": {"family": "qwen3"},
    # A config as transformers 4.x wrote it: rope_theta / rope_scaling instead of rope_parameters.
    "llama3-transformers4-config": {
        "family": "llama",
        "legacy_config": True,
        "rope_parameters": LLAMA3_ROPE,
    },
    "phi3-partial-rotary": {
        "family": "phi3",
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
    },
    # Saved in bfloat16, as most HF checkpoints are; the export converts to float16.
    "qwen2-bf16": {"family": "qwen2", "dtype": "bfloat16"},
    # Vision-language models: export-llm exports the language model (MRoPE decoder), text-only parity.
    "qwen2_vl": {"family": "qwen2_vl"},
    "qwen2_5_vl": {"family": "qwen2_5_vl"},
}


def pytest_collection_modifyitems(items):
    """Modules that drive Snakemake first (they take most of the suite's time), each module's tests in order.

    xdist's loadfile hands out modules in collection order, so a long module collected last
    would leave one worker running alone at the end.
    """
    items.sort(key=lambda item: item.get_closest_marker("workflow") is None)


@pytest.fixture(scope="session")
def checkpoint_factory(tmp_path_factory):
    """``checkpoint_factory(case)`` -> a tiny checkpoint directory, made once per session."""
    made: dict[str, Path] = {}

    def factory(case: str, **overrides) -> Path:
        key = case + repr(sorted(overrides.items()))
        if key not in made:
            options = copy.deepcopy({**TINY_CASES.get(case, {}), **overrides})
            family = options.pop("family", case)
            legacy = options.pop("legacy_config", False)
            made[key] = make_checkpoint(tmp_path_factory.mktemp(case) / "ckpt", family=family, **options)
            if legacy:
                as_transformers4_config(made[key] / "config.json")
        return made[key]

    return factory


@pytest.fixture(scope="session")
def exported(checkpoint_factory, tmp_path_factory):
    """``exported(case)`` -> (checkpoint, export dir) of a tiny case, exported once per session."""
    from edgellm_steps.export.export_llm import export_llm

    done = {}

    def export(case: str):
        if case not in done:
            checkpoint = checkpoint_factory(case)
            out = tmp_path_factory.mktemp(f"export-{case}") / "llm"
            export_llm(checkpoint, out)
            done[case] = (checkpoint, out)
        return done[case]

    return export


def as_transformers4_config(path: Path) -> None:
    """Rewrite a transformers 5 config.json the way transformers 4.x spelled it."""
    config = json.loads(path.read_text())
    rope = config.pop("rope_parameters")
    config["rope_theta"] = rope.pop("rope_theta")
    if rope.get("rope_type", "default") != "default":
        rope["type"] = rope.pop("rope_type")
        config["rope_scaling"] = rope
    else:
        config["rope_scaling"] = None
    config["torch_dtype"] = config.pop("dtype")
    config["transformers_version"] = "4.51.3"
    path.write_text(json.dumps(config, indent=2))


def tool_env() -> dict[str, str]:
    """The environment for subprocesses: this venv's console scripts first on PATH."""
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def run_snakemake(
    workdir: Path, *args: str, check: bool = True, snakefile: Path | None = None, env: dict[str, str] | None = None
):
    """Run the real workflow in ``workdir``; returns the CompletedProcess (stdout+stderr merged)."""
    command = [
        str(BIN / "snakemake"),
        "--snakefile",
        str(snakefile or REPO / "Snakefile"),
        "--directory",
        str(workdir),
        "--cores",
        "2",
        *args,
    ]
    result = subprocess.run(command, env=env or tool_env(), capture_output=True, text=True)
    result.output = result.stdout + result.stderr
    if check and result.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed ({result.returncode}):\n{result.output[-4000:]}")
    return result


def write_config(workdir: Path, text: str) -> Path:
    path = workdir / "config.yaml"
    path.write_text(text)
    return path


def copy_checkpoint(source: Path, destination: Path) -> Path:
    shutil.copytree(source, destination)
    return destination


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


#: The one-model workflow most workflow tests build.
ONNX = "onnx/tiny_fp16/llm/model.onnx"
MANIFEST = "onnx/tiny_fp16/llm/manifest.json"
NOTHING = "Nothing to be done"

CONFIG = """\
models:
  tiny:
    source: ckpt
"""
