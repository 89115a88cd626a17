"""Whether this host can build an engine for an SM target: TensorRT, a GPU of that SM, the plugin library.

Checked before any work, each in one line naming the fix: an engine runs only on the SM it was built for.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import subprocess
from pathlib import Path

from edgellm_steps.errors import EdgeLLMError, MissingDependencyError

log = logging.getLogger(__name__)

PLUGIN_ENV = "EDGELLM_PLUGIN_PATH"


def visible_gpu_sm() -> int | None:
    """SM of the first visible GPU (e.g. 87), or None when there is none."""
    try:
        result = subprocess.run(
            ["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return None
    lines = [line.strip() for line in result.stdout.splitlines() if line.strip()]
    if result.returncode != 0 or not lines:
        return None
    major, _, minor = lines[0].partition(".")
    return int(major) * 10 + int(minor or 0)


def check_build_host(sm: int, plugin_path: str | None) -> Path:
    """Fail in one line, before any work, when this host cannot build for ``sm``; returns the plugin path."""
    allocation = {
        k: os.environ[k] for k in ("CUDA_VISIBLE_DEVICES", "SLURM_JOB_ID", "SLURM_GPUS_ON_NODE") if k in os.environ
    }
    log.info("GPU allocation: %s", " ".join(f"{k}={v}" for k, v in allocation.items()) or "none")
    if importlib.util.find_spec("tensorrt") is None:
        raise MissingDependencyError(
            "TensorRT is not installed on this host: engines build on a GPU machine with "
            "`pip install 'edgellm-steps[engine]'` (or the envs/engine.yaml conda env)"
        )
    visible = visible_gpu_sm()
    if visible is None:
        raise MissingDependencyError(
            f"no NVIDIA GPU is visible here (nvidia-smi found none); build sm{sm} on an SM{sm} GPU"
        )
    if visible != sm:
        raise EdgeLLMError(
            f"the visible GPU is sm{visible} but the target is sm{sm}: an engine runs only on its own SM"
        )
    path = plugin_path or os.environ.get(PLUGIN_ENV)
    if not path or not Path(path).is_file():
        raise MissingDependencyError(
            f"the Edge-LLM plugin library is not found ({PLUGIN_ENV}={path!r}); "
            f"set {PLUGIN_ENV} to libNvInfer_edgellm_plugin.so"
        )
    return Path(path)
