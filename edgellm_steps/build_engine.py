"""build-engine: an exported ONNX directory -> a TensorRT engine for one SM target.

This release plans engine jobs (targets, SM checks, resources) and checks the
build host; the TensorRT build itself is not implemented yet and says so.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

from edgellm_steps.errors import EdgeLLMError, MissingDependencyError
from edgellm_steps.manifest import MANIFEST_NAME

log = logging.getLogger(__name__)


def check_build_host() -> None:
    """Fail in one line when TensorRT is not importable here."""
    if importlib.util.find_spec("tensorrt") is None:
        raise MissingDependencyError(
            "TensorRT is not installed on this host: engines build on a GPU machine with "
            "`pip install 'edgellm-steps[engine]'` (or the envs/engine.yaml conda env)"
        )


def build_engine(onnx_dir: str | Path, engine: str | Path, *, sm: int, **limits: int) -> Path:
    """Build the engine of ``onnx_dir`` for SM ``sm`` into ``engine``."""
    onnx_dir = Path(onnx_dir)
    if not (onnx_dir / MANIFEST_NAME).is_file():
        raise EdgeLLMError(f"{onnx_dir} is not a finished export (no {MANIFEST_NAME}); run the export first")
    check_build_host()
    raise EdgeLLMError(
        f"building TensorRT engines is not implemented in this release (sm{sm}, limits {limits}); "
        f"the ONNX export in {onnx_dir} is ready for Edge-LLM's own engine builder"
    )
