"""The four kinds of export, one row each: where each lives, what it holds, and the engine it makes.

An export directory is ``onnx/<model>_<precision>/<directory>/`` (the vision encoder's
``onnx/<model>/visual/``, shared by every LLM precision). Its manifest names the step that wrote
it, its ``config.json`` the ``model_type`` the runtime reads; build-engine tells the kind from
those two, names the engine and config files by the row, and builds the optimization profiles of
the row's ``profile`` (LLM or vision encoder). The rules declare each kind's files from ``files``.

This module is read at planning time: it imports nothing heavy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from edgellm_steps.artifacts import steps
from edgellm_steps.errors import EdgeLLMError
from edgellm_steps.graph.opsets import EXTERNAL_DATA_FILE, ONNX_NAME

#: Every export holds its graph, the graph's external data, config.json and manifest.json.
GRAPH_FILES = (ONNX_NAME, EXTERNAL_DATA_FILE, "config.json")
MANIFEST = "manifest.json"


@dataclass(frozen=True, kw_only=True)
class ExportKind:
    """One kind of export and of the engine built from it."""

    name: str
    #: Sub-directory of the export target (``onnx/<model>_<precision>/<directory>``).
    directory: str
    #: The step named in the export's manifest.
    step: str
    #: ``model_type`` of the export's config.json that marks it; None: any other (a plain LLM, a vision encoder).
    model_type: str | None
    #: Sidecar files the export rule declares (besides the graph files and the manifest); the runtime
    #: reads them beside the engine.
    sidecars: tuple[str, ...]
    #: The engine file and its config's file name in the engine directory (contract section 8).
    engine_file: str
    engine_config: str
    #: Which optimization profiles and build limits the engine takes (``engine/limits.py``).
    profile: Literal["llm", "visual"]
    #: How a message names the engine.
    description: str

    @property
    def files(self) -> tuple[str, ...]:
        """Every file the export rule declares, the manifest last."""
        return (*GRAPH_FILES, *self.sidecars, MANIFEST)


LLM = ExportKind(
    name="llm",
    directory="llm",
    step=steps.EXPORT_LLM,
    model_type=None,
    sidecars=("embedding.safetensors", "tokenizer.json", "tokenizer_config.json", "processed_chat_template.json"),
    engine_file="llm.engine",
    engine_config="config.json",
    profile="llm",
    description="an LLM engine",
)
EAGLE_BASE = ExportKind(
    name="eagle_base",
    directory="eagle_base",
    step=steps.EXPORT_LLM,
    model_type="eagle3_base",
    sidecars=("embedding.safetensors",),
    engine_file="eagle_base.engine",
    engine_config="base_config.json",
    profile="llm",
    description="an EAGLE base engine",
)
DRAFT = ExportKind(
    name="draft",
    directory="draft",
    step=steps.EXPORT_DRAFT,
    model_type="eagle3_draft",
    sidecars=("d2t.safetensors",),
    engine_file="eagle_draft.engine",
    engine_config="draft_config.json",
    profile="llm",
    description="an EAGLE draft engine",
)
VISUAL = ExportKind(
    name="visual",
    directory="visual",
    step=steps.EXPORT_VISUAL,
    model_type=None,
    sidecars=("preprocessor_config.json",),
    engine_file="visual.engine",
    engine_config="config.json",
    profile="visual",
    description="a vision engine",
)

#: Every kind, by name.
EXPORT_KINDS = {kind.name: kind for kind in (LLM, EAGLE_BASE, DRAFT, VISUAL)}


def kind_of(step: str, export_config: dict[str, Any]) -> ExportKind:
    """The kind of an export written by ``step`` whose config.json is ``export_config``."""
    model_type = export_config.get("model_type")
    rows = [kind for kind in EXPORT_KINDS.values() if kind.step == step]
    for kind in rows:
        if kind.model_type is not None and kind.model_type == model_type:
            return kind
    plain = [kind for kind in rows if kind.model_type is None]
    if not plain:
        raise EdgeLLMError(f"an {step} output with model_type {model_type!r} is no export this release knows")
    return plain[0]
