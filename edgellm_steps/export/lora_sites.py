"""Where a LoRA delta attaches in an exported decoder graph: recorded by export-llm, read by insert-lora.

insert-lora must not read the weights (contract 6), and a quantized GEMM is many nodes (Q/DQ
pairs, smoothing Muls, plugins), so the graph's own structure is a poor guide to "the
activation before quantization" and "the GEMM's output". The exporter knows both when it
emits each GEMM and records them in the model's ``metadata_props`` (TensorRT ignores them):
one site per adaptable GEMM, in graph order.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import onnx

from edgellm_steps.errors import EdgeLLMError

METADATA_KEY = "edgellm.lora_sites"


@dataclass(frozen=True)
class LoraSite:
    """One adaptable GEMM: y = GEMM(x) (+ bias) with x [.., in_features] and y [.., out_features], both float16."""

    module: str
    input: str
    output: str
    in_features: int
    out_features: int


def record_sites(model: onnx.ModelProto, sites: list[LoraSite]) -> None:
    """Store ``sites`` in ``model``'s metadata."""
    entry = model.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps([asdict(site) for site in sites])


def read_sites(model: onnx.ModelProto, where: str) -> list[LoraSite]:
    """The sites export-llm recorded in ``model``, or a one-line refusal for a graph without them."""
    for entry in model.metadata_props:
        if entry.key == METADATA_KEY:
            return [LoraSite(**site) for site in json.loads(entry.value)]
    raise EdgeLLMError(
        f"{where} records no LoRA sites (metadata {METADATA_KEY}); it was not written by this export-llm: "
        "export it again (snakemake --forcerun export_llm <target>)"
    )
