"""merge-lora: a model and one of its PEFT LoRA adapters -> an HF checkpoint with the adapter folded in.

The classic test matrix's ``merge_lora``: a model variant that serves one adapter with no LoRA
inputs at all. PEFT folds B A x scaling into each adapted weight (``merge_and_unload``) in
float32, and the result is saved in the source's dtype with its tokenizer files, so quantize-llm
and export-llm read it as any checkpoint: a quantized variant quantizes the merged weights.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

from edgellm_steps.artifacts import steps
from edgellm_steps.artifacts.atomic import staged_directory
from edgellm_steps.artifacts.checkpoint import TensorStore
from edgellm_steps.artifacts.manifest import write_manifest
from edgellm_steps.artifacts.safetensors_io import write_safetensors
from edgellm_steps.artifacts.sources import resolve_source
from edgellm_steps.artifacts.tokenizer_files import TOKENIZER_ASSETS, copy_tokenizer_files
from edgellm_steps.errors import PrecisionError
from edgellm_steps.lora.adapter_fit import read_fitting_adapter
from edgellm_steps.quant.checkpoint_record import open_checkpoint

log = logging.getLogger(__name__)


@contextlib.contextmanager
def _shards_hashed_as_written() -> Iterator[None]:
    """Have ``save_pretrained`` write its shards with our safetensors writer, so the manifest need not read them.

    transformers writes each shard with the safetensors library's ``save_file``, imported into
    ``transformers.modeling_utils`` as ``safe_save_file``. :func:`write_safetensors` writes the same bytes
    (tested against ``save_file`` for every dtype), around the page cache, hashing them as it goes.
    Where a transformers version has no such name, it writes its own way and the manifest reads the
    shards to hash them: slower, never different.
    """
    from transformers import modeling_utils

    original = getattr(modeling_utils, "safe_save_file", None)
    if original is None:
        yield
        return

    def save(tensors: dict, filename: str, metadata: dict[str, str] | None = None) -> None:
        write_safetensors(Path(filename), tensors, metadata=metadata)

    modeling_utils.safe_save_file = save
    try:
        yield
    finally:
        modeling_utils.safe_save_file = original


def merge_lora(model_dir: str | Path, adapter_dir: str | Path, output_dir: str | Path) -> Path:
    """Fold the PEFT adapter ``adapter_dir`` into ``model_dir``'s weights, writing the checkpoint ``output_dir``."""
    opened = open_checkpoint(model_dir)
    checkpoint, config, spec, held = opened.path, opened.hf_config, opened.spec, opened.held
    adapter = resolve_source(str(adapter_dir), allow_download=True)
    if held is not None:
        raise PrecisionError(
            f"{checkpoint} is already quantized as {held.precision}; an adapter merges into float weights only"
        )
    read_fitting_adapter(adapter, config, str(checkpoint), tensors=False, merge=True)  # it fits, before any loading
    TensorStore(checkpoint)  # every shard header checked before transformers reads them

    import peft
    import torch
    import transformers

    dtype = getattr(torch, str(config.get("torch_dtype") or config.get("dtype") or "float32"))
    auto = getattr(transformers, spec.hf_auto_class)
    model = auto.from_pretrained(str(checkpoint), dtype=torch.float32, use_safetensors=True)
    # The adapter is data: read_adapter accepted safetensors weights only, and PEFT loads those.
    merged = peft.PeftModel.from_pretrained(model, str(adapter)).merge_and_unload().to(dtype)
    with staged_directory(Path(output_dir)) as staging:
        with _shards_hashed_as_written():
            merged.save_pretrained(str(staging), safe_serialization=True)
        copy_tokenizer_files(checkpoint, staging, TOKENIZER_ASSETS)
        write_manifest(
            staging, step=steps.MERGE_LORA, parameters={"model": str(model_dir), "adapter": str(adapter_dir)}
        )
    log.info("merged %s into %s -> %s", adapter, checkpoint, output_dir)
    return Path(output_dir)
