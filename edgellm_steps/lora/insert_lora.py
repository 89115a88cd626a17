"""insert-lora: an exported LLM graph -> ``lora_model.onnx`` beside it, with LoRA inputs on every adaptable GEMM.

Contract 6: for each GEMM but ``lm_head``, the float16 inputs ``<module>.lora_A.weight``
[K, rank] and ``<module>.lora_B.weight`` [rank, N], rank a symbolic dim per module
(``<module>.rank``), and MatMul(x, A) -> MatMul(., B) -> Add(y, .) where x is the GEMM's
activation before any quantization and y its output. The sites come from the graph's own
record (:mod:`edgellm_steps.export.lora_sites`); the weights are never read: the new graph
points at the same ``onnx_model.data``, so inserting LoRA into an 8B export takes a moment.

Fed rank-0 tensors (what the runtime binds for a module the active adapter does not touch)
the delta is an empty product, zero, and the graph computes what ``model.onnx`` does.
"""

from __future__ import annotations

import logging
from pathlib import Path

import onnx
from onnx import helper

from edgellm_steps.artifacts import steps
from edgellm_steps.artifacts.atomic import write_if_changed
from edgellm_steps.artifacts.digests import file_digest
from edgellm_steps.artifacts.manifest import check_listed_file
from edgellm_steps.errors import EdgeLLMError
from edgellm_steps.export import llm_io
from edgellm_steps.export.lora_sites import LoraSite, read_sites
from edgellm_steps.graph.onnx_builder import ONNX_NAME

log = logging.getLogger(__name__)

LORA_ONNX_NAME = "lora_model.onnx"
#: Metadata of ``lora_model.onnx``: the digest of the ``model.onnx`` it was made from.
SOURCE_KEY = "edgellm.lora_source_xxh3_128"


def _lora_nodes(site: LoraSite, x: str, delta_out: str) -> list[onnx.NodeProto]:
    path = "/" + site.module.replace(".", "/")
    down = f"{path}/lora_A/MatMul_output_0"
    up = f"{path}/lora_B/MatMul_output_0"
    return [
        helper.make_node("MatMul", [x, llm_io.lora_a_name(site.module)], [down], f"{path}/lora_A/MatMul"),
        helper.make_node("MatMul", [down, llm_io.lora_b_name(site.module)], [up], f"{path}/lora_B/MatMul"),
        helper.make_node("Add", [site.output, up], [delta_out], f"{path}/lora/Add"),
    ]


def add_lora(model: onnx.ModelProto, sites: list[LoraSite]) -> None:
    """Rewrite ``model`` in place: every site's output gains its LoRA delta before any consumer reads it."""
    graph = model.graph
    taken = {i.name for i in graph.input}
    if clash := [s.module for s in sites if llm_io.lora_a_name(s.module) in taken]:
        raise EdgeLLMError(f"the graph already has LoRA inputs (for {clash[0]}); insert-lora reads model.onnx only")
    adapted = {site.output: f"{site.output}/lora" for site in sites}
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in adapted:
                node.input[i] = adapted[name]
    if exposed := [o.name for o in graph.output if o.name in adapted]:
        raise EdgeLLMError(f"a LoRA site's output {exposed[0]} is a graph output; the graph is not an LLM export")
    by_output = {site.output: site for site in sites}
    nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        nodes.append(node)
        for out in node.output:
            if (site := by_output.get(out)) is not None:
                # A site reading another site's output reads it adapted, as every other consumer does.
                nodes += _lora_nodes(site, adapted.get(site.input, site.input), adapted[out])
    if (placed := sum(n.op_type == "Add" and n.name.endswith("/lora/Add") for n in nodes)) != len(sites):
        raise EdgeLLMError(f"{len(sites) - placed} LoRA sites name outputs no node of the graph produces")
    del graph.node[:]
    graph.node.extend(nodes)
    for site in sites:
        for spec in llm_io.lora_inputs(site.module, site.in_features, site.out_features):
            graph.input.append(helper.make_tensor_value_info(spec.name, spec.elem_type, list(spec.dims)))


def insert_lora(onnx_dir: str | Path) -> Path:
    """Write ``lora_model.onnx`` beside the export-llm output ``onnx_dir``'s ``model.onnx``; returns its path."""
    onnx_dir = Path(onnx_dir)
    check_listed_file(onnx_dir, steps.EXPORT_LLM, ONNX_NAME)  # model.onnx only: the weights are never read
    source = onnx_dir / ONNX_NAME
    model = onnx.load(str(source), load_external_data=False)
    sites = read_sites(model, str(source))
    if not sites:
        raise EdgeLLMError(f"{source} records no adaptable GEMM; nothing for LoRA to attach to")
    add_lora(model, sites)
    entry = model.metadata_props.add()
    entry.key, entry.value = SOURCE_KEY, file_digest(source)
    destination = onnx_dir / LORA_ONNX_NAME
    # The bare protobuf: the initializers keep pointing at onnx_model.data, which is neither read nor written.
    write_if_changed(destination, model.SerializeToString())
    log.info("wrote %s: LoRA inputs on %d GEMMs", destination, len(sites))
    return destination
