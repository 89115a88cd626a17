"""merge-lora: a model and one of its PEFT LoRA adapters -> an HF checkpoint with the adapter folded in.

The classic test matrix's ``merge_lora``: a model variant that serves one adapter with no LoRA
inputs at all. Each adapted weight becomes PEFT's ``merge_and_unload`` of it, computed the way PEFT
computes it on a float32 model: ``W + (B @ A) * scaling`` in float32, then rounded once to the weight's
stored dtype, so the merged tensors are PEFT's bit for bit (tested). Nothing else changes: every other
tensor, the shard layout and index, ``config.json``, the generation config and the tokenizer files are
the source's byte for byte, so quantize-llm and export-llm read the result as any checkpoint of its
family.

The checkpoint is streamed shard by shard and tensor by tensor (:mod:`~edgellm_steps.artifacts.shard_rewrite`),
an adapted weight a slice of rows at a time: the step holds the adapter and one adapted weight's B A in
float32, never the model, whatever its size.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from edgellm_steps.artifacts import steps
from edgellm_steps.artifacts.atomic import staged_directory
from edgellm_steps.artifacts.checkpoint import INDEX_NAME, TensorStore, weight_files
from edgellm_steps.artifacts.manifest import write_manifest
from edgellm_steps.artifacts.safetensors_io import SafetensorsFile
from edgellm_steps.artifacts.shard_rewrite import Rewritten, rewrite_shard
from edgellm_steps.artifacts.sources import resolve_source
from edgellm_steps.artifacts.tokenizer_files import TOKENIZER_ASSETS, copy_tokenizer_files
from edgellm_steps.errors import PrecisionError, SourceError
from edgellm_steps.lora.adapter_fit import graph_module, read_fitting_adapter
from edgellm_steps.lora.peft_adapter import PEFT_PREFIX, AdapterModule
from edgellm_steps.quant.checkpoint_record import open_checkpoint

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

#: The source's files besides its weights that the merged checkpoint carries, byte for byte, when present.
CARRIED_FILES = ("config.json", "generation_config.json", *TOKENIZER_ASSETS)


#: Float32 bytes of the row slices a weight merges in: below the C allocator's mmap threshold, so with
#: ``reuse_freed_buffers`` (the CLI's) each slice reuses the last one's pages instead of faulting in new ones.
MERGE_SLICE_BYTES = 16 * 2**20


def lora_delta(module: AdapterModule, out: torch.Tensor | None = None) -> torch.Tensor:
    """``(B @ A) * scaling`` in float32, as PEFT's ``get_delta_weight`` computes it on a float32 model.

    The product is computed whole (a matrix product's rounding may depend on how its rows are split), into
    ``out`` when given, and scaled in place: the same rounding as PEFT's out-of-place product.
    """
    import torch

    delta = torch.mm(module.b.float(), module.a.float(), out=out)
    delta *= module.scaling
    return delta


def _float32_sum(rows: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    merged = rows.float()
    merged += delta
    return merged


def merged_rows(rows: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """Rows of a weight with the matching rows of its :func:`lora_delta` added in float32, rounded back to its dtype.

    PEFT adds the delta to the float32 weight in place and the model is cast back to its dtype afterwards; both
    are element by element, so merging a weight a slice of rows at a time gives the same bits.
    """
    return _float32_sum(rows, delta).to(rows.dtype)


def merged_weight(weight: torch.Tensor, module: AdapterModule) -> torch.Tensor:
    """``weight`` with ``module``'s B A folded in, as PEFT's ``merge_and_unload`` computes it on a float32 model."""
    return merged_rows(weight, lora_delta(module))


class _ProductBuffer:
    """One float32 buffer the products B A of successive weights are computed into.

    A new product per weight would be mapped and zeroed by the kernel anew (an 8B model's merge spent a
    fifth of its time so); the buffer is as large as the largest product so far.
    """

    def __init__(self) -> None:
        self._flat: torch.Tensor | None = None

    def delta(self, module: AdapterModule) -> torch.Tensor:
        import torch

        size = module.out_features * module.in_features
        if self._flat is None or self._flat.numel() < size:
            self._flat = None
            self._flat = torch.empty(size, dtype=torch.float32)
        return lora_delta(module, out=self._flat[:size].view(module.out_features, module.in_features))


def stored_weight_names(
    modules: list[AdapterModule], store: TensorStore, renames: tuple[tuple[str, str], ...], where: str
) -> dict[str, AdapterModule]:
    """Stored tensor name -> the adapter module that adapts it, through the family's load-time renaming.

    PEFT names a module as the loaded model does; the checkpoint may store it under another prefix
    (``FamilySpec.hf_renames``). An adapted module whose weight the checkpoint does not hold with the
    adapter's shape is refused, naming the key.
    """
    adapted: dict[str, AdapterModule] = {}
    for module in modules:
        loaded = [f"{module.module}.weight", f"{graph_module(module.module)}.weight"]
        candidates = loaded + [
            stored + name.removeprefix(prefix)
            for name in loaded
            for stored, prefix in renames
            if name.startswith(prefix)
        ]
        found = next((name for name in candidates if name in store), None)
        key = f"{PEFT_PREFIX}{module.module}.lora_A.weight"
        if found is None:
            raise SourceError(f"{where}: adapter key {key} adapts {loaded[0]}, which the checkpoint does not hold")
        if store.shape(found) != (module.out_features, module.in_features):
            raise SourceError(
                f"{where}: adapter key {key} adapts {found} as {module.in_features} -> {module.out_features}, "
                f"but the checkpoint's is {store.shape(found)[1]} -> {store.shape(found)[0]}"
            )
        if module.saved_base is not None and not _same_values(module.saved_base, store.get(found)):
            raise SourceError(
                f"{where}: the adapter carries its own {found} (PEFT's save_embedding_layers), which differs from "
                "the checkpoint's (a resized or retrained LM head?); merge it into the checkpoint it was trained on"
            )
        if found in adapted:
            raise SourceError(
                f"{where}: {PEFT_PREFIX}{adapted[found].module} and {PEFT_PREFIX}{module.module} both adapt {found}; "
                "an adapter adapts each weight once"
            )
        adapted[found] = module
    return adapted


def _same_values(saved: torch.Tensor, stored: torch.Tensor) -> bool:
    """Whether the adapter's copy of a weight holds the checkpoint's values (PEFT saves it in the training dtype)."""
    return saved.shape == stored.shape and bool((saved.float() == stored.float()).all())


def _representable(merged: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether float32 ``merged`` is finite and within ``dtype``'s range: one pass, no temporary (``isfinite`` on
    a half-precision tensor costs ten times the merge)."""
    import torch

    low, high = torch.aminmax(merged)
    limit = torch.finfo(dtype).max
    return bool(low >= -limit) and bool(high <= limit)  # False for NaN


def _merged_chunks(
    shard: SafetensorsFile, name: str, module: AdapterModule, products: _ProductBuffer, where: str
) -> Iterator[torch.Tensor]:
    """The merged weight ``name`` in slices of rows (:data:`MERGE_SLICE_BYTES` in float32), refused when the merge
    made a finite weight infinite or NaN (what PEFT's safe merge checks)."""
    import torch

    delta = products.delta(module)
    rows = max(1, MERGE_SLICE_BYTES // (4 * max(1, module.in_features)))
    first = 0
    for chunk in shard.read_row_chunks(name, rows):
        total = _float32_sum(chunk, delta[first : first + len(chunk)])
        merged = total.to(chunk.dtype)
        overflowed = not _representable(total, chunk.dtype) and not bool(torch.isfinite(merged).all())
        if overflowed and bool(torch.isfinite(chunk).all()):
            raise SourceError(
                f"{where}: merging {PEFT_PREFIX}{module.module} makes {name} overflow its {chunk.dtype} "
                "(inf or NaN); the adapter is broken or was trained for another model"
            )
        first += len(chunk)
        yield merged


def merge_lora(model_dir: str | Path, adapter_dir: str | Path, output_dir: str | Path) -> Path:
    """Fold the PEFT adapter ``adapter_dir`` into ``model_dir``'s weights, writing the checkpoint ``output_dir``."""
    opened = open_checkpoint(model_dir)
    checkpoint, config, spec, held = opened.path, opened.hf_config, opened.spec, opened.held
    adapter = resolve_source(str(adapter_dir), allow_download=True)
    if held is not None:
        raise PrecisionError(
            f"{checkpoint} is already quantized as {held.precision}; an adapter merges into float weights only"
        )
    # The adapter is data: read_adapter accepts safetensors weights of plain LoRA on Linears only.
    _, modules = read_fitting_adapter(adapter, config, str(checkpoint), tensors=True, merge=True)
    store = TensorStore(checkpoint)  # every shard header checked before any is written
    adapted = stored_weight_names(modules, store, spec.hf_renames, str(adapter))
    products = _ProductBuffer()
    with staged_directory(Path(output_dir)) as staging:
        for path in weight_files(checkpoint):
            shard = SafetensorsFile(path)
            changed = {
                name: Rewritten(
                    shard.dtype(name),
                    lambda name=name, shard=shard: _merged_chunks(shard, name, adapted[name], products, str(adapter)),
                )
                for name in shard.names()
                if name in adapted
            }
            rewrite_shard(shard, staging / path.relative_to(checkpoint), changed)
        if (checkpoint / INDEX_NAME).is_file():
            shutil.copyfile(checkpoint / INDEX_NAME, staging / INDEX_NAME)  # same names, shards and sizes
        copy_tokenizer_files(checkpoint, staging, CARRIED_FILES)
        parameters = {
            "model": str(model_dir),
            "adapter": str(adapter_dir),
            "changed": {
                "weights": f"{len(adapted)} adapted weights: W + (B @ A) x scaling in float32, rounded to their "
                "stored dtype; every other tensor and file byte for byte"
            },
        }
        write_manifest(staging, step=steps.MERGE_LORA, parameters=parameters)
    log.info("merged %s (%d weights) into %s -> %s", adapter, len(adapted), checkpoint, output_dir)
    return Path(output_dir)
