"""calibrate-llm: the shared statistics pass of a model, which quantize-llm reads for every precision it serves.

One float pass through the layers on the calibration set records each activation quantizer's per-channel
maxima (``activation_statistics.py``); quantize-llm then makes fp8, int8_sq, nvfp4 and the LM-head and
KV-cache overrides from them without running the model again, each precision in its own job and directory.
The output directory holds ``statistics.safetensors`` (one vector per quantizer: 1 MB for a 0.5B model, 5 MB for
an 8B) and a manifest.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from edgellm_steps.artifacts import steps
from edgellm_steps.artifacts.atomic import staged_directory
from edgellm_steps.artifacts.manifest import write_manifest
from edgellm_steps.quant.activation_statistics import collect_statistics, save_statistics
from edgellm_steps.quant.calibration import calibration_batches, calibration_record
from edgellm_steps.quant.calibration_source import (
    DEFAULT_CALIB_MAX_TOKENS,
    DEFAULT_CALIB_SIZE,
    device_and_dtype,
    float_source,
)
from edgellm_steps.quant.formats import STATISTICS_BATCH
from edgellm_steps.quant.nvfp4 import cpu_fake_quantization

log = logging.getLogger(__name__)


def calibrate_llm(
    model_dir: str | Path,
    output_dir: str | Path,
    *,
    dataset_dir: str | None = None,
    device: str = "cpu",
    calib_size: int = DEFAULT_CALIB_SIZE,
    calib_max_tokens: int = DEFAULT_CALIB_MAX_TOKENS,
    calib_batch_size: int | None = None,
) -> Path:
    """Record ``model_dir``'s activation maxima on ``dataset_dir`` (built-in corpus when None) in ``output_dir``."""
    started = time.monotonic()
    device, dtype = device_and_dtype(device)
    opened = float_source(model_dir)
    checkpoint, spec = opened.path, opened.spec

    import torch
    import transformers

    batch = calib_batch_size or STATISTICS_BATCH
    batches = calibration_batches(checkpoint, dataset_dir, calib_size, calib_max_tokens, batch)
    record = calibration_record(dataset_dir, calib_size, calib_max_tokens, batch, device)
    log.info("observing %d samples x %d tokens (batch %d) on %s", calib_size, calib_max_tokens, batch, device)
    with staged_directory(Path(output_dir)) as staging:
        with cpu_fake_quantization(), torch.no_grad():
            observed = collect_statistics(
                checkpoint,
                getattr(transformers, spec.hf_auto_class),
                spec.hf_renames,
                batches,
                dtype=dtype,
                device=device,
            )
        save_statistics(observed, staging, record, checkpoint)
        write_manifest(staging, step=steps.CALIBRATE_LLM, parameters=record)
    log.info("statistics of %d quantizers recorded in %.1f s", len(observed.maxima), time.monotonic() - started)
    return Path(output_dir)
