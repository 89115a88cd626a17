"""build-engine: an exported ONNX directory -> the runtime's engine directory for one SM target.

The build needs TensorRT, the Edge-LLM plugin library (``EDGELLM_PLUGIN_PATH``) and a visible
GPU whose SM equals the target (``engine/host.py``). Everything that can be checked is checked
before the (long) TensorRT build (``engine/trt_build.py``): the export and its kind, the parts
placed into the directory (a vision engine, a draft engine, LoRA adapters), the host. The
directory (``engine/layout.py``) appears only when complete.
"""

from __future__ import annotations

import json
from pathlib import Path

import onnx

from edgellm_steps.artifacts import steps
from edgellm_steps.artifacts.manifest import check_step_output, read_manifest_step
from edgellm_steps.engine import host
from edgellm_steps.engine.layout import check_component_engine, export_kind_of, write_engine_dir
from edgellm_steps.engine.limits import BuildLimits, image_token_limits
from edgellm_steps.engine.profiles import engine_kind, engine_profiles, is_tiled
from edgellm_steps.engine.trt_build import serialize_engine
from edgellm_steps.errors import EdgeLLMError
from edgellm_steps.export.kinds import DRAFT, EAGLE_BASE, EXPORT_KINDS, LLM, VISUAL, ExportKind
from edgellm_steps.graph.onnx_builder import ONNX_NAME
from edgellm_steps.lora import insert_lora


def check_export(onnx_dir: Path) -> ExportKind:
    """The kind of a finished export directory, its files checked."""
    steps = {kind.step for kind in EXPORT_KINDS.values()}
    step = read_manifest_step(onnx_dir)
    check_step_output(onnx_dir, step if step in steps else LLM.step)  # raises, naming what is wrong
    return export_kind_of(onnx_dir)


def check_lora_graph(onnx_dir: Path, limits: BuildLimits) -> Path:
    """``lora_model.onnx`` of the finished LLM export ``onnx_dir``, made from its ``model.onnx``, and limits that
    admit LoRA; returns its path.

    Where the graph came from is insert-lora's to check (:func:`insert_lora.check_lora_graph`, shared with
    verify-onnx); the rank is the engine's.
    """
    path = insert_lora.check_lora_graph(onnx_dir)
    if limits.max_lora_rank < 1:
        raise EdgeLLMError(
            "max_lora_rank is 0, so the engine would take no LoRA rank; set it to the largest rank served"
        )
    return path


def check_lora_adapters(adapters: dict[str, str | Path], limits: BuildLimits) -> dict[str, Path]:
    """Finished process-lora outputs whose rank the engine's ``max_lora_rank`` admits."""
    checked = {}
    for name, directory in sorted(adapters.items()):
        directory = Path(directory)
        check_step_output(directory, steps.PROCESS_LORA)
        rank = json.loads((directory / "config.json").read_text())["r"]
        if rank > limits.max_lora_rank:
            raise EdgeLLMError(
                f"adapter '{name}' ({directory}) has rank {rank} but the engine's max_lora_rank is "
                f"{limits.max_lora_rank}; raise max_lora_rank"
            )
        checked[name] = directory
    return checked


def build_engine(
    onnx_dir: str | Path,
    engine_dir: str | Path,
    *,
    sm: int,
    limits: BuildLimits,
    plugin_path: str | None = None,
    visual_engine_dir: str | Path | None = None,
    draft_engine_dir: str | Path | None = None,
    lora: bool = False,
    lora_adapters: dict[str, str | Path] | None = None,
) -> Path:
    """Build the engine of ``onnx_dir`` for SM ``sm`` into the directory ``engine_dir``.

    ``visual_engine_dir`` (an LLM engine of a vision-language model) is placed in ``visual/``;
    ``draft_engine_dir`` (an EAGLE base's draft engine) beside the base engine. ``lora`` builds
    from ``lora_model.onnx`` (LoRA rank profiles 0 / R/2 / R); ``lora_adapters`` (name -> a
    process-lora output, implying ``lora``) are linked in ``lora/<name>``.
    """
    onnx_dir, engine_dir = Path(onnx_dir), Path(engine_dir)
    kind = check_export(onnx_dir)
    visual = check_component_engine(Path(visual_engine_dir), sm, VISUAL) if visual_engine_dir else None
    if visual is not None and kind.profile != "llm":
        raise EdgeLLMError(f"{onnx_dir} is a vision encoder export; only an LLM engine holds a vision engine")
    draft = check_component_engine(Path(draft_engine_dir), sm, DRAFT) if draft_engine_dir else None
    if draft is not None and kind is not EAGLE_BASE:
        raise EdgeLLMError(f"{onnx_dir} is not an EAGLE base export; only an EAGLE base engine holds a draft engine")
    lora = lora or bool(lora_adapters)
    if lora and kind is not LLM:
        raise EdgeLLMError(f"{onnx_dir} is not a plain LLM export; LoRA engines build from an export-llm output")
    graph_path = check_lora_graph(onnx_dir, limits) if lora else onnx_dir / ONNX_NAME
    adapters = check_lora_adapters(lora_adapters or {}, limits)
    plugin = host.check_build_host(sm, plugin_path)
    graph = onnx.load(str(graph_path), load_external_data=False)
    if engine_kind(graph) != kind.profile:
        raise EdgeLLMError(
            f"{onnx_dir}: its manifest says a {kind.profile} export but the graph makes a {engine_kind(graph)}"
        )
    if kind.profile == VISUAL.profile:
        limits = image_token_limits(limits, tiled=is_tiled(graph), where=str(onnx_dir))
    engine = serialize_engine(graph_path, engine_profiles(graph, limits), plugin)
    return write_engine_dir(
        engine_dir,
        onnx_dir,
        engine,
        sm=sm,
        limits=limits,
        visual_engine_dir=visual,
        draft_engine_dir=draft,
        lora_adapters=adapters,
    )
