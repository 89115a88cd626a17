"""quantize-llm: an HF checkpoint -> a ModelOpt fake-quantized HF checkpoint, one decoder layer at a time.

The output directory is a normal HF checkpoint (weights, with smoothing and AWQ scales folded in
by ModelOpt, plus every quantizer's calibrated ``_amax`` / ``_pre_quant_scale`` as tensors, in
shards with an index as ``save_pretrained`` writes a large model), ``modelopt_state.pth`` (the
quantizers' configuration, plain data that verify reads back weights-only), the source's tokenizer
files copied byte for byte, and ``edgellm_quantization.json`` naming the precision for the export
step. Calibration is ModelOpt's ``mtq.quantize`` applied layer by layer (``layerwise.py``), which
gives the whole-model result in about one layer's memory.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from edgellm_steps.artifacts import steps
from edgellm_steps.artifacts.atomic import staged_directory
from edgellm_steps.artifacts.checkpoint import TensorStore
from edgellm_steps.artifacts.manifest import write_manifest
from edgellm_steps.artifacts.shard_writer import ShardWriter
from edgellm_steps.artifacts.tokenizer_files import TOKENIZER_ASSETS, copy_tokenizer_files
from edgellm_steps.errors import PrecisionError
from edgellm_steps.quant.activation_statistics import load_statistics
from edgellm_steps.quant.calibration import calibration_batches, calibration_record
from edgellm_steps.quant.calibration_source import (
    DEFAULT_CALIB_MAX_TOKENS,
    DEFAULT_CALIB_SIZE,
    device_and_dtype,
    float_source,
)
from edgellm_steps.quant.exclusions import decoder_linears, excluded_linears, exclusion_patterns
from edgellm_steps.quant.formats import FORMATS
from edgellm_steps.quant.layerwise import quantize_layerwise
from edgellm_steps.quant.nvfp4 import cpu_fake_quantization
from edgellm_steps.quant.precision import Precision, parse_precision
from edgellm_steps.quant.prequantized import MODELOPT_STATE, QUANT_INFO
from edgellm_steps.quant.recipes import calibration_batch_size, modelopt_config
from edgellm_steps.quant.shape_checks import check_block_dims

log = logging.getLogger(__name__)


def quantizable_precision(text: str) -> Precision:
    """``text`` parsed, or a refusal when the quantize step cannot make it (nothing to calibrate, a held format)."""
    precision = parse_precision(text)
    if not precision.needs_quantize_step:
        raise PrecisionError(f"precision '{precision}' needs no quantize step: export the checkpoint directly")
    weights = FORMATS[precision.weights]
    if not weights.made_here:
        raise PrecisionError(
            f"{weights.name} means a checkpoint already quantized with {weights.quant_method_label}: export it directly"
        )
    return precision


def quantization_record(
    precision: Precision, calibration: dict[str, Any], exclude: tuple[str, ...] = (), excluded: list[str] | None = None
) -> dict[str, Any]:
    """``edgellm_quantization.json``: the precision the export reads back, how it was calibrated, and the
    Linears kept in float (``quantization.exclude``'s patterns and what they matched)."""
    import modelopt

    return {
        "precision": str(precision),
        "weights": precision.weights,
        "lm_head": precision.lm_head,
        "kv_cache": precision.kv_cache,
        "calibration": calibration,
        "exclude": list(exclude),
        "excluded_linears": excluded or [],
        "modelopt_version": modelopt.__version__,
    }


def stable_modelopt_state(state: dict[str, Any]) -> dict[str, Any]:
    """``state`` (as ``mto.modelopt_state`` returns it) with each quantizer's properties in sorted order.

    ModelOpt lists a quantizer's properties by iterating a set of attribute names
    (``TensorQuantizer._get_properties_for_modelopt_state``), so their order, and with it the
    pickled bytes of ``modelopt_state.pth``, follows ``PYTHONHASHSEED``: two identical runs
    would write different files and manifests, and every downstream step would rebuild. Only
    those property dicts are reordered: ModelOpt restores them by name (again through a
    set), while the order of everything else (the modes, the ``quant_cfg`` patterns, whose
    order is their precedence) is meaningful and already fixed.
    """
    modes = []
    for mode, mode_state in state.get("modelopt_state_dict", []):
        metadata = mode_state.get("metadata") if isinstance(mode_state, dict) else None
        quantizers = metadata.get("quantizer_state") if isinstance(metadata, dict) else None
        if isinstance(quantizers, dict):
            quantizers = {name: _sorted_properties(props) for name, props in quantizers.items()}
            mode_state = {**mode_state, "metadata": {**metadata, "quantizer_state": quantizers}}
        modes.append((mode, mode_state))
    return {**state, "modelopt_state_dict": modes}


def _sorted_properties(properties: Any) -> Any:
    """One quantizer's property dict in key order; anything else as it is."""
    if isinstance(properties, dict) and all(isinstance(key, str) for key in properties):
        return dict(sorted(properties.items()))
    return properties


def save_modelopt_state(model: Any, path: Path) -> None:
    """Write ``model``'s ModelOpt state to ``path``, the same bytes for the same model whatever the hash seed."""
    import modelopt.torch.opt as mto
    import torch

    torch.save(stable_modelopt_state(mto.modelopt_state(model)), path)


def save_model_config(model: Any, checkpoint: Path, directory: Path) -> None:
    """config.json and generation_config.json as ``save_pretrained`` writes them for the model loaded from
    ``checkpoint`` in the calibration dtype (the generation config is the checkpoint's own when it has one)."""
    import transformers

    model.config.save_pretrained(str(directory))
    if (checkpoint / "generation_config.json").is_file():
        model.generation_config = transformers.GenerationConfig.from_pretrained(str(checkpoint))
    if model.can_generate() and model.generation_config is not None:
        model.generation_config.save_pretrained(str(directory))


def quantize_llm(
    model_dir: str | Path,
    output_dir: str | Path,
    *,
    precision: str,
    statistics_dir: str | Path | None = None,
    dataset_dir: str | None = None,
    device: str = "cpu",
    calib_size: int = DEFAULT_CALIB_SIZE,
    calib_max_tokens: int = DEFAULT_CALIB_MAX_TOKENS,
    calib_batch_size: int | None = None,
    exclude: tuple[str, ...] = (),
) -> Path:
    """Quantize ``model_dir`` with ModelOpt: from the shared pass's ``statistics_dir`` (calibrate-llm's output)
    when given, else calibrating on ``dataset_dir`` (built-in corpus when None). The decoder Linears matched
    by ``exclude`` (shell-style patterns over stored module names) stay float (``exclusions.py``)."""
    started = time.monotonic()
    precision = quantizable_precision(precision)
    device, dtype = device_and_dtype(device)
    opened = float_source(model_dir)
    checkpoint, hf_config, spec = opened.path, opened.hf_config, opened.spec
    check_block_dims(hf_config, precision, where=str(checkpoint))
    exclude = tuple(exclude)
    store = TensorStore(checkpoint)
    excluded = excluded_linears(exclude, decoder_linears(store, spec.resolved(store.names())), str(checkpoint))

    import torch
    import transformers

    if statistics_dir is not None:
        if not precision.from_statistics:
            raise PrecisionError(
                f"{precision.weights} calibrates on the activations themselves (AWQ's search), not from the shared "
                "statistics: quantize it without --statistics_dir"
            )
        shared, recorded = load_statistics(Path(statistics_dir), checkpoint)
        calibration, source = {**recorded, "statistics": "shared"}, {"statistics": shared}
        log.info("calibrating %s from the shared statistics of %s", precision, statistics_dir)
    else:
        batch = calib_batch_size or calibration_batch_size(precision)
        batches = calibration_batches(checkpoint, dataset_dir, calib_size, calib_max_tokens, batch)
        calibration = calibration_record(dataset_dir, calib_size, calib_max_tokens, batch, device)
        source = {"batches": batches}
        log.info(
            "calibrating %s on %d samples x %d tokens (batch %d) on %s",
            precision,
            calib_size,
            calib_max_tokens,
            batch,
            device,
        )

    # Layer by layer (quant/layerwise.py): ModelOpt's quantize on one decoder layer at a time, its weights read
    # from the shards (safetensors only: nothing in the source, a modelopt_state.pth or a pickled .bin, is ever
    # unpickled), so memory holds one layer and the cached hidden states whatever the model's size.
    auto_class = getattr(transformers, spec.hf_auto_class)
    config = modelopt_config(precision, spec.quant_exclude + exclusion_patterns(excluded, spec.hf_renames))
    if excluded:
        log.info("keeping %d Linears in float (quantization.exclude %s)", len(excluded), list(exclude))
    info = quantization_record(precision, calibration, exclude, excluded)
    with staged_directory(Path(output_dir)) as staging:
        # Tensors the calibration did not change are written in their stored dtype, not the calibration's.
        writer = ShardWriter(staging, stored_dtypes={name: store.dtype(name) for name in store.names()})
        with cpu_fake_quantization(), torch.no_grad():
            result = quantize_layerwise(
                checkpoint,
                auto_class,
                spec.hf_renames,
                config,
                **source,
                dtype=dtype,
                device=device,
                write=writer.add,
                stage_written=writer.end_group,
                calibrate_head=precision.lm_head is not None,
            )
        writer.close()
        save_model_config(result.model, checkpoint, staging)
        torch.save(stable_modelopt_state(result.modelopt_state), staging / MODELOPT_STATE)
        copy_tokenizer_files(checkpoint, staging, TOKENIZER_ASSETS)
        (staging / QUANT_INFO).write_text(json.dumps(info, indent=2) + "\n")
        write_manifest(staging, step=steps.QUANTIZE_LLM, parameters=info)
    log.info("quantization finished in %.1f s", time.monotonic() - started)
    return Path(output_dir)
