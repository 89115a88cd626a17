"""dequantize-fp8: a block-FP8 release -> the float checkpoint every other step reads as its source.

The classic Edge-LLM ABI has no block-FP8 GEMM, so a ``*-FP8`` release (``block_fp8.py``) is turned
once into the float checkpoint it stands for: each F8_E4M3 weight becomes fp8 x ``weight_scale_inv``
over its 128 x 128 blocks (edge blocks cropped), multiplied in float32 and rounded once to the
config's float dtype, the dtype of the release's other tensors. Everything else travels byte for
byte: the other tensors (same names, dtypes and shards), the tokenizer and every other file; the
scales are dropped, ``config.json`` loses ``quantization_config`` and nothing else, and an index
loses the scales' entries. The output is then a float source for every precision: fp16 exports these
weights as they are, quantized precisions calibrate again from them.

Shards are streamed one tensor at a time, and a weight 128 rows at a time (one row of blocks), so the
step holds a bounded slice of the checkpoint whatever its size. The output is staged and replaces
the destination whole, with a manifest, like every step's.
"""

from __future__ import annotations

import json
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
from edgellm_steps.artifacts.sources import checkpoint_files
from edgellm_steps.errors import SourceError
from edgellm_steps.quant.block_fp8 import FLOAT_DTYPES, SCALE_SUFFIX, WEIGHT_DTYPE, WEIGHT_SUFFIX, BlockFP8Source
from edgellm_steps.quant.checkpoint_record import open_checkpoint

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

CONFIG_NAME = "config.json"


def dequantize_weight(
    weight: torch.Tensor, scale: torch.Tensor, block: tuple[int, int], dtype: torch.dtype
) -> torch.Tensor:
    """fp8 ``weight`` [rows, cols] times its block ``scale`` [ceil(rows/bm), ceil(cols/bn)], in ``dtype``.

    The product is taken in float32 (an E4M3 value and a float32 scale multiply exactly there, but
    for the product's own rounding) and rounded once to ``dtype``. ``weight`` may be a slice of rows
    that starts on a block boundary, with the matching rows of ``scale``.
    """
    rows, cols = weight.shape
    per_row = scale.float().repeat_interleave(block[0], dim=0)[:rows]
    return (weight.float() * per_row.repeat_interleave(block[1], dim=1)[:, :cols]).to(dtype)


def _dequantized_chunks(
    shard: SafetensorsFile, name: str, scales: TensorStore, source: BlockFP8Source, dtype: torch.dtype
) -> Iterator[torch.Tensor]:
    """One F8 weight, dequantized one row of blocks at a time (its scale may lie in another shard)."""
    block = source.config.block
    scale = scales.get(name.removesuffix(WEIGHT_SUFFIX) + SCALE_SUFFIX)
    for index, rows in enumerate(shard.read_row_chunks(name, block[0])):
        yield dequantize_weight(rows, scale[index : index + 1], block, dtype)


def _write_shard(shard: SafetensorsFile, destination: Path, scales: TensorStore, source: BlockFP8Source) -> int:
    """Write ``shard`` without its scales, its F8 weights dequantized; returns the bytes of tensor data."""
    import torch

    torch_dtype = getattr(torch, source.config.dtype)
    changed = {
        name: Rewritten(
            FLOAT_DTYPES[source.config.dtype],
            lambda name=name: _dequantized_chunks(shard, name, scales, source, torch_dtype),
        )
        for name in shard.names()
        if shard.dtype(name) == WEIGHT_DTYPE
    }
    dropped = [name for name in shard.names() if name.endswith(SCALE_SUFFIX)]
    return rewrite_shard(shard, destination, changed, dropped)


def _write_index(checkpoint: Path, staging: Path, total_size: int) -> None:
    """The source's index without the scales' entries, its ``total_size`` the dequantized one."""
    index = json.loads((checkpoint / INDEX_NAME).read_text(encoding="utf-8"))
    index["weight_map"] = {
        name: shard for name, shard in index["weight_map"].items() if not name.endswith(SCALE_SUFFIX)
    }
    index["metadata"] = {**(index.get("metadata") or {}), "total_size": total_size}
    (staging / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def dequantize_fp8(model_dir: str | Path, output_dir: str | Path) -> Path:
    """Write the float checkpoint of the block-FP8 release ``model_dir`` into ``output_dir`` (replaced whole)."""
    opened = open_checkpoint(model_dir, allow_block_fp8=True)
    checkpoint, source = opened.path, opened.block_fp8
    if source is None:
        raise SourceError(
            f"{checkpoint} is no block-FP8 release (config.json has no quantization_config with quant_method fp8); "
            "it needs no dequantizing: give it to the other steps as it is"
        )
    shards = weight_files(checkpoint)
    weights = {shard.relative_to(checkpoint) for shard in shards} | {Path(INDEX_NAME), Path(CONFIG_NAME)}
    with staged_directory(Path(output_dir)) as staging:
        scales = TensorStore(checkpoint)
        total = sum(
            _write_shard(SafetensorsFile(shard), staging / shard.relative_to(checkpoint), scales, source)
            for shard in shards
        )
        if (checkpoint / INDEX_NAME).is_file():
            _write_index(checkpoint, staging, total)
        config = dict(opened.hf_config)
        removed = config.pop("quantization_config")
        (staging / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        for relative in checkpoint_files(checkpoint):
            if relative not in weights:
                (staging / relative).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(checkpoint / relative, staging / relative)
        parameters = {
            "model": str(model_dir),
            "block": list(source.config.block),
            "dtype": source.config.dtype,
            "dequantized_weights": len(source.quantized),
            "changed": {
                CONFIG_NAME: {"removed": {"quantization_config": removed}},
                "weights": f"{len(source.quantized)} {WEIGHT_DTYPE} weights -> {source.config.dtype}, their "
                f"{SCALE_SUFFIX.lstrip('.')} tensors dropped; every other tensor and file byte for byte",
            },
        }
        write_manifest(staging, step=steps.DEQUANTIZE_FP8, parameters=parameters)
    log.info("dequantized %d block-FP8 weights of %s -> %s", len(source.quantized), checkpoint, output_dir)
    return Path(output_dir)
