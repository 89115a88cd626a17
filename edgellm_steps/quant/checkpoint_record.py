"""One opened, checked HF checkpoint: what the planner and every step used to work out separately.

:func:`open_checkpoint` resolves a source (a directory or a hub id), reads ``config.json``,
finds the family and its normalized dims, checks them, lists the weight files, checks the
tokenizer and reads the precision the checkpoint already holds. It reads JSON and file
headers only, so planning calls it as cheaply as a step does; what it finds wrong is a
:class:`~edgellm_steps.errors.SourceError` (or ``PrecisionError``) in one line.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgellm_steps.artifacts.checkpoint import DecoderDims, decoder_dims, weight_files
from edgellm_steps.artifacts.sources import read_hf_config, resolve_source
from edgellm_steps.artifacts.tokenizer_files import check_tokenizer
from edgellm_steps.errors import PrecisionError, SourceError
from edgellm_steps.models.families import FamilySpec, family_for
from edgellm_steps.models.vision_geometry import check_vision_source
from edgellm_steps.quant.block_fp8 import BlockFP8Source, block_fp8_config, check_block_fp8_weights
from edgellm_steps.quant.formats import FLOAT_WEIGHTS, FORMATS
from edgellm_steps.quant.gptq import check_gptq_config
from edgellm_steps.quant.precision import Precision
from edgellm_steps.quant.prequantized import HeldPrecision, held_precision
from edgellm_steps.quant.shape_checks import check_block_dims
from edgellm_steps.quant.source_weights import check_source_weights


@dataclass(frozen=True)
class OpenedCheckpoint:
    """A local checkpoint of a supported decoder family, checked."""

    path: Path
    hf_config: dict[str, Any]
    spec: FamilySpec
    dims: DecoderDims
    #: The files that hold its weights (safetensors shards).
    weight_files: tuple[Path, ...]
    #: The precision it already holds; None for a float checkpoint.
    held: HeldPrecision | None
    #: A block-FP8 release (opened with ``allow_block_fp8``): read only once dequantized, as a float source.
    block_fp8: BlockFP8Source | None = None

    @property
    def precision(self) -> Precision:
        """What an export of it carries: the held precision, or float weights."""
        return self.held.precision if self.held is not None else Precision(FLOAT_WEIGHTS)

    @property
    def weight_bytes(self) -> int:
        return sum(path.stat().st_size for path in self.weight_files)


def open_checkpoint(
    source: str | Path,
    *,
    model: str | None = None,
    where: str | None = None,
    allow_download: bool = True,
    allow_block_fp8: bool = False,
) -> OpenedCheckpoint:
    """Open ``source`` and check everything a step would otherwise find out only after loading the model.

    ``model`` names the workflow model in messages (planning passes it, and resolves without
    downloading); ``where`` names the checkpoint in a refused architecture's message (default: its path).
    A block-FP8 release is refused unless ``allow_block_fp8`` (planning, and the dequantize step): then
    its block scales are checked and ``block_fp8`` describes it, and it holds no precision of its own.
    """
    path = resolve_source(str(source), model=model, allow_download=allow_download)
    hf_config = read_hf_config(path, model=model)
    spec = family_for(hf_config, where=where or str(path))
    try:
        dims = decoder_dims(hf_config)
        spec.check_dims(dims)
        spec.check_text_model(hf_config)
        files = tuple(weight_files(path))
        check_tokenizer(path)
        block = block_fp8_config(hf_config, where=str(path / "config.json")) if allow_block_fp8 else None
        held = held_precision(path, hf_config) if block is None else None
        check_source_weights(path, spec, dims, held)
        block_fp8 = check_block_fp8_weights(path, block) if block is not None else None
        if spec.vision is not None:
            check_vision_source(path, hf_config, spec.vision, dims.hidden_size)
    except SourceError as err:
        if model is None:
            raise
        raise SourceError(f"model '{model}' ({path}): {err}") from err
    return OpenedCheckpoint(path, hf_config, spec, dims, files, held, block_fp8)


def check_source_fits(opened: OpenedCheckpoint, precision: Precision, model: str) -> None:
    """A float source is quantized to any precision made here; a pre-quantized one is exported as the precision
    it holds, and only as that one (refused in one line naming the target to ask for)."""
    held, where = opened.held, f"model '{model}'"
    weights = FORMATS[precision.weights]
    if held is None:
        if not weights.made_here:
            raise PrecisionError(
                f"{where}: {weights.name} exports a checkpoint already quantized with {weights.quant_method_label} "
                f"(quantization_config.quant_method: {weights.quant_method}), and this one is not; "
                f"use {weights.quantize_instead} to quantize it"
            )
    elif precision != held.precision:
        raise PrecisionError(
            f"{where}: the source is already quantized as {held.precision} ({held.origin}) and is never read as "
            f"fp16 or quantized again; request precision {held.precision} "
            f"(onnx/{model}_{held.precision}/llm/model.onnx)"
        )
    elif held.gptq is not None:
        check_gptq_config(held.gptq, where=where)
    check_block_dims(opened.hf_config, precision, where=where)
