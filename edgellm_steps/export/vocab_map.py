"""The reduced-vocabulary map (contract 4): ``vocab_map.safetensors``, int32 ascending ids, read and checked."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgellm_steps.artifacts import steps
from edgellm_steps.artifacts.manifest import check_if_step_output
from edgellm_steps.errors import SourceError

VOCAB_MAP_FILE = "vocab_map.safetensors"


def load_vocab_map(directory: str | Path, vocab_size: int) -> np.ndarray:
    """A reduced vocabulary's ids (int32, ascending, unique, inside the model's vocabulary), checked."""
    from safetensors.numpy import load_file

    path = Path(directory) / VOCAB_MAP_FILE
    check_if_step_output(Path(directory), steps.REDUCE_VOCAB)
    if not path.is_file():
        raise SourceError(f"{directory} has no {VOCAB_MAP_FILE}; make it with edgellm-reduce-vocab")
    ids = load_file(str(path)).get("vocab_map")
    if ids is None or ids.dtype != np.int32 or ids.ndim != 1 or len(ids) == 0:
        raise SourceError(f"{path} must hold one int32 vector 'vocab_map'")
    if np.any(np.diff(ids) <= 0) or ids[0] < 0 or ids[-1] >= vocab_size:
        raise SourceError(f"{path}: ids must be ascending, unique and below the vocabulary size {vocab_size}")
    return ids
