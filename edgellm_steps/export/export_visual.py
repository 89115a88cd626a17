"""export-visual: the vision tower of an HF vision-language checkpoint -> the Edge-LLM vision ONNX directory.

Output (contract section 7): ``model.onnx`` + ``onnx_model.data``, ``config.json`` (the
checkpoint's whole HF config plus ``edgellm_version``), the processor files the runtime
reads (``preprocessor_config.json``: patch and merge sizes, mean and std) and our
``manifest.json``. With ``quantization="fp8"`` every Linear of the tower is fp8, calibrated
on generated images (:mod:`edgellm_steps.quant.visual_calibration`); the patch embedding
(a Conv3d) stays fp16. The directory replaces ``output_dir`` whole, only when complete.
A Qwen3-VL tower (learned positions, deepstack outputs, contract 7.2) is built by
:class:`~edgellm_steps.export.visual_graph_qwen3.Qwen3VisualGraph`, an InternVL one (tiles, contract 7.3) by
:class:`~edgellm_steps.export.visual_graph_internvl.InternVLVisualGraph`, the others by
:class:`~edgellm_steps.export.visual_graph.VisualGraph`.
"""

from __future__ import annotations

import logging
import time
from functools import partial
from pathlib import Path
from typing import Any

import onnx

from edgellm_steps import EDGELLM_VERSION
from edgellm_steps.artifacts import steps
from edgellm_steps.artifacts.atomic import staged_directory
from edgellm_steps.artifacts.manifest import write_manifest
from edgellm_steps.artifacts.sources import resolve_source
from edgellm_steps.artifacts.streamed_file import StreamedFile, available_cores
from edgellm_steps.artifacts.tokenizer_files import PROCESSOR_FILES, copy_tokenizer_files
from edgellm_steps.errors import PrecisionError
from edgellm_steps.export.sidecars import write_json
from edgellm_steps.export.visual_graph import VisualGraph
from edgellm_steps.export.visual_graph_internvl import InternVLVisualGraph
from edgellm_steps.export.visual_graph_phi4mm import Phi4mmVisualGraph
from edgellm_steps.export.visual_graph_qwen3 import Qwen3VisualGraph
from edgellm_steps.graph.onnx_builder import ONNX_NAME, GraphBuilder, write_graph
from edgellm_steps.models.vision_geometry import VisionTower, open_vision_tower
from edgellm_steps.quant.visual_calibration import calibrate_fp8_tower

log = logging.getLogger(__name__)

#: Weight precisions of a vision encoder export.
VISUAL_PRECISIONS = ("fp16", "fp8")


def visual_config(hf_config: dict[str, Any], precision: str) -> dict[str, Any]:
    """``config.json`` of the vision export: the whole HF config plus what the runtime reads at top level.

    The runtime's Qwen-VL vision runner reads ``vocab_size`` and ``rope_theta`` at the top level
    (the transformers 4.x layout); a transformers 5 config keeps them in ``text_config``, so they
    are copied up when absent.
    """
    config = dict(hf_config)
    text = hf_config.get("text_config") or {}
    if "vocab_size" not in config and "vocab_size" in text:
        config["vocab_size"] = text["vocab_size"]
    if "rope_theta" not in config:
        rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
        theta = text.get("rope_theta", rope.get("rope_theta"))
        if theta is not None:
            config["rope_theta"] = theta
    config["edgellm_version"] = EDGELLM_VERSION
    config["edgellm_visual_precision"] = precision
    return config


def _graph(builder: GraphBuilder, tower: VisionTower, store: Any, fp8_modules: frozenset[str]) -> VisualGraph:
    """The graph builder of the tower's kind, over ``store`` (the checkpoint, or calibrated tensors in front of it)."""
    args = (builder, store, tower.spec, tower.dims, tower.prefix)
    if tower.spec.tiled:
        tiled = {"internvl": InternVLVisualGraph, "phi4mm": Phi4mmVisualGraph}[tower.spec.tiles]
        return tiled(*args, projector=tower.projector, fp8_modules=fp8_modules)
    graph = Qwen3VisualGraph if tower.spec.deepstack else VisualGraph
    return graph(*args, fp8_modules=fp8_modules)


def _build(graph: VisualGraph, staging: Path) -> onnx.ModelProto:
    """The graph, and the side files a tiled tower's runtime reads beside it (Phi-4-multimodal's separators)."""
    model = graph.build()
    if isinstance(graph, InternVLVisualGraph):
        graph.write_sidecars(staging)
    return model


def export_visual(
    model_dir: str | Path, output_dir: str | Path, *, quantization: str = "fp16", threads: int | None = None
) -> Path:
    """Export the vision tower of ``model_dir`` (local directory or hub id) into ``output_dir``.

    The weights stream to disk as export-llm's do (converted on ``threads`` threads, default every core
    this process may use; hashed as written).
    """
    started = time.monotonic()
    if quantization not in VISUAL_PRECISIONS:
        raise PrecisionError(
            f"vision encoder precision {quantization!r} is not supported; use one of {', '.join(VISUAL_PRECISIONS)}"
        )
    checkpoint = resolve_source(str(model_dir), allow_download=True)
    tower = open_vision_tower(checkpoint)  # the processor config checked too
    dims, store = tower.dims, tower.store
    fp8_modules: frozenset[str] = frozenset()
    if quantization == "fp8":
        store, fp8_modules = calibrate_fp8_tower(tower)
    output_dir = Path(output_dir)
    log.info("exporting the vision tower of %s (%d blocks, %s) to %s", checkpoint, dims.depth, quantization, output_dir)
    with staged_directory(output_dir) as staging:
        write_graph(
            staging,
            lambda builder: _build(_graph(builder, tower, store, fp8_modules), staging),
            partial(StreamedFile, threads=threads or available_cores()),
        )
        write_json(staging / "config.json", visual_config(tower.hf_config, quantization))
        copy_tokenizer_files(checkpoint, staging, PROCESSOR_FILES)
        write_manifest(staging, step=steps.EXPORT_VISUAL, parameters={"precision": quantization})
    log.info("vision export finished in %.1f s", time.monotonic() - started)
    return output_dir / ONNX_NAME
