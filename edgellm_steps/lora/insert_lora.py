"""insert-lora: an exported LLM graph -> ``lora_model.onnx`` beside it, with LoRA inputs on every adaptable GEMM.

Contract 6: for each GEMM but ``lm_head``, the float16 inputs ``<module>.lora_A.weight``
[K, rank] and ``<module>.lora_B.weight`` [rank, N], rank a symbolic dim per module
(``<module>.rank``), and MatMul(x, A) -> MatMul(., B) -> Add(y, .) where x is the GEMM's
activation before any quantization and y its output. The sites come from the graph's own
record (:mod:`edgellm_steps.export.lora_sites`); the weights are never read: the new graph
points at the same ``onnx_model.data``, so inserting LoRA into an 8B export takes a moment.

Fed rank-0 tensors (what the runtime binds for a module the active adapter does not touch)
the delta is an empty product, zero, and the graph computes what ``model.onnx`` does.

``lora_model.onnx`` lives in a directory export-llm owns, so it is written as every step output
is, only file by file: claimed, staged beside it, renamed into place only while this run still
holds the claim (an orphan of a killed workflow never replaces a newer graph), and stamped with
the digest of the ``model.onnx`` it was made from, which every consumer checks
(:func:`check_lora_graph`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError
from onnx import helper

from edgellm_steps.artifacts import steps
from edgellm_steps.artifacts.atomic import claim_file, write_claimed
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
    """Write ``lora_model.onnx`` beside the export-llm output ``onnx_dir``'s ``model.onnx``; returns its path.

    Raises :class:`~edgellm_steps.artifacts.claims.SupersededError` when a run started later
    claimed ``lora_model.onnx`` first; an unchanged graph is left alone (its mtime kept).
    """
    onnx_dir = Path(onnx_dir)
    # model.onnx only: the weights are never read. Checked before claiming: no claim file in a non-export.
    manifest = check_listed_file(onnx_dir, steps.EXPORT_LLM, ONNX_NAME)
    destination = onnx_dir / LORA_ONNX_NAME
    claim = claim_file(destination)
    source = onnx_dir / ONNX_NAME
    model = onnx.load(str(source), load_external_data=False)
    sites = read_sites(model, str(source))
    if not sites:
        raise EdgeLLMError(f"{source} records no adaptable GEMM; nothing for LoRA to attach to")
    add_lora(model, sites)
    entry = model.metadata_props.add()
    entry.key, entry.value = SOURCE_KEY, manifest["files"][ONNX_NAME]["xxh3_128"]
    # The bare protobuf: the initializers keep pointing at onnx_model.data, which is neither read nor written.
    written = write_claimed(claim, model.SerializeToString())
    log.info("%s %s: LoRA inputs on %d GEMMs", "wrote" if written else "kept the unchanged", destination, len(sites))
    return destination


def check_lora_graph(onnx_dir: str | Path) -> Path:
    """``lora_model.onnx`` of the export-llm output ``onnx_dir``, proven made from its current ``model.onnx``.

    For every consumer (verify-onnx with an adapter, build-engine with LoRA): a LoRA graph left
    from an earlier ``model.onnx`` would run other weights' graph against this export's weights
    file. Returns its path; else one line naming the insert-lora run that fixes it.
    """
    onnx_dir = Path(onnx_dir)
    path, rerun = onnx_dir / LORA_ONNX_NAME, f"run edgellm-insert-lora --onnx_dir {onnx_dir}"
    if not path.is_file():
        raise EdgeLLMError(f"{onnx_dir} has no {LORA_ONNX_NAME}; {rerun} first")
    model_digest = check_listed_file(onnx_dir, steps.EXPORT_LLM, ONNX_NAME)["files"][ONNX_NAME]["xxh3_128"]
    try:
        made_from = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    except DecodeError:
        raise EdgeLLMError(f"{path} is not a readable ONNX graph; {rerun} again") from None
    if made_from.get(SOURCE_KEY) != model_digest:
        raise EdgeLLMError(
            f"{path} was made from another model.onnx than the export's (it was re-exported since); {rerun} again"
        )
    return path
