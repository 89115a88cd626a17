"""process-lora: a PEFT LoRA adapter -> ``processed_adapter_model.safetensors`` + ``config.json`` (contract 6).

Each adapted module's A becomes ``<module>.lora_A.weight`` [in, r] and its B, scaled by PEFT's
scaling (alpha / r, or alpha / sqrt(r) with rsLoRA, per ``rank_pattern`` / ``alpha_pattern``),
``<module>.lora_B.weight`` [r, out], both float16: exactly the inputs insert-lora adds, so the
runtime binds every tensor by name. ``<module>`` is PEFT's key with ``base_model.model.``
stripped and a leading ``model.`` ensured. LoRA on norms or lm_head has no graph input and is
dropped, with a warning naming it. Given the model, every other module must be a GEMM of its
graph with the adapter's shapes, or the adapter is refused naming the key, because the
runtime would silently give an unmatched name rank 0.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from edgellm_steps.artifacts import steps
from edgellm_steps.artifacts.atomic import staged_directory
from edgellm_steps.artifacts.manifest import write_manifest
from edgellm_steps.artifacts.safetensors_io import write_safetensors
from edgellm_steps.artifacts.sources import read_hf_config, resolve_source
from edgellm_steps.export import llm_io
from edgellm_steps.lora.adapter_fit import graph_module, read_fitting_adapter
from edgellm_steps.lora.peft_adapter import AdapterModule

log = logging.getLogger(__name__)

PROCESSED_WEIGHTS = "processed_adapter_model.safetensors"


def processed_tensors(modules: list[AdapterModule]) -> dict[str, Any]:
    """The runtime's tensors: A as [in, r], B scaled and as [r, out], float16."""
    import torch

    tensors = {}
    for m in modules:
        name = graph_module(m.module)
        tensors[llm_io.lora_a_name(name)] = m.a.float().T.contiguous().to(torch.float16)
        tensors[llm_io.lora_b_name(name)] = (m.b.float() * m.scaling).T.contiguous().to(torch.float16)
    return tensors


def process_lora(input_dir: str | Path, output_dir: str | Path, *, model_dir: str | Path | None = None) -> Path:
    """Process the PEFT adapter ``input_dir`` into ``output_dir``, checked against ``model_dir`` when given."""
    adapter = resolve_source(str(input_dir), allow_download=True)
    checkpoint = resolve_source(str(model_dir), allow_download=True) if model_dir is not None else None
    model_config = read_hf_config(checkpoint) if checkpoint is not None else None
    config, modules = read_fitting_adapter(adapter, model_config, str(checkpoint))
    ranks = {graph_module(m.module): m.rank for m in modules}
    processed = {
        "r": max(ranks.values()),
        "lora_alpha": config.get("lora_alpha"),
        "use_rslora": bool(config.get("use_rslora")),
        "target_modules": sorted({name.rsplit(".", 1)[-1] for name in ranks}),
        "ranks": ranks,
        "base_model_name_or_path": config.get("base_model_name_or_path"),
    }
    with staged_directory(Path(output_dir)) as staging:
        # The safetensors library's bytes, hashed as they are written (the manifest does not read them again).
        write_safetensors(staging / PROCESSED_WEIGHTS, processed_tensors(modules), metadata={"format": "pt"})
        (staging / "config.json").write_text(json.dumps(processed, indent=2) + "\n")
        write_manifest(
            staging, step=steps.PROCESS_LORA, parameters={"adapter": str(input_dir), "max_rank": processed["r"]}
        )
    log.info("processed %d LoRA modules (max rank %d) into %s", len(modules), processed["r"], output_dir)
    return Path(output_dir)
