"""Where an EAGLE3 draft's weights are: safetensors, or the ``pytorch_model.bin`` many drafts are published as.

Base checkpoints must be safetensors (:func:`~edgellm_steps.artifacts.checkpoint.weight_files`).
Published EAGLE3 drafts often ship a single ``pytorch_model.bin``; it is read only through
torch's weights-only unpickler (``weights_only=True`` passed explicitly, so the
``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` environment variable cannot turn it off), which builds
tensors and plain containers and refuses any other object: a crafted file fails to load
instead of running code. A draft is one decoder layer, so holding it in memory is cheap.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgellm_steps.artifacts.checkpoint import TensorStore, read_tensor_headers, weight_files
from edgellm_steps.errors import SourceError

DRAFT_BIN = "pytorch_model.bin"


def draft_weight_files(checkpoint: Path) -> list[Path]:
    """The draft's safetensors files, or its ``pytorch_model.bin`` when it has no safetensors (torch-free)."""
    checkpoint = Path(checkpoint)
    try:
        return weight_files(checkpoint)
    except SourceError:
        if (checkpoint / DRAFT_BIN).is_file():
            return [checkpoint / DRAFT_BIN]
        raise


def open_draft_store(checkpoint: Path) -> Any:
    """A store over the draft's tensors: the shards, or the weights-only load of ``pytorch_model.bin``."""
    import pickle

    import torch

    from edgellm_steps.artifacts.memory_store import MemoryStore

    files = draft_weight_files(checkpoint)
    if files[0].name != DRAFT_BIN:
        return TensorStore(checkpoint)
    try:
        state = torch.load(files[0], map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise SourceError(
            f"{files[0]} is refused by the weights-only loader ({reason}); give the draft as safetensors"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise SourceError(f"{files[0]} is not a state dict of tensors; give the draft as safetensors")
    return MemoryStore(state, where=str(files[0]))


def draft_d2t_header(checkpoint: Path) -> tuple[str | None, Any] | None:
    """(stored dtype or None when absent, a reader of its values) of a safetensors draft's ``d2t``, torch-free.

    None for a ``pytorch_model.bin`` draft: its tensors come only from the weights-only loader
    (torch), which planning does not import; the export step checks that draft's ``d2t``.
    """
    from edgellm_steps.artifacts.safetensors_io import SafetensorsFile

    files = draft_weight_files(checkpoint)
    if files[0].name == DRAFT_BIN:
        return None
    header = read_tensor_headers(checkpoint).get("d2t")
    if header is None:
        return None, None
    return header.dtype, lambda: SafetensorsFile(header.shard).read_array("d2t")
