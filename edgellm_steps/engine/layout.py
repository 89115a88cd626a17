"""The runtime's engine directory: which files an engine directory holds, and where its parts go.

The engine directory (the ``.engine`` target) holds the engine file and its config (named by the
export kind: ``llm.engine`` + ``config.json``, ``visual.engine``, ``eagle_base.engine`` +
``base_config.json``, ...), the config being the export's plus ``builder_config``, and the export's
sidecars. A vision-language model's LLM engine directory also holds ``visual/``, its vision
engine directory for the same SM (``--engineDir <dir> --multimodalEngineDir <dir>/visual``); an
EAGLE base's holds its draft engine's files beside its own; a LoRA engine links each processed
adapter in ``lora/<name>``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import onnx

from edgellm_steps.artifacts import steps
from edgellm_steps.artifacts.atomic import staged_directory
from edgellm_steps.artifacts.manifest import check_step_output, read_manifest_step, write_manifest
from edgellm_steps.engine.limits import LIMITS_READ, BuildLimits
from edgellm_steps.errors import EdgeLLMError
from edgellm_steps.export import llm_io
from edgellm_steps.export.kinds import DRAFT, EAGLE_BASE, EXPORT_KINDS, ExportKind, kind_of
from edgellm_steps.graph.opsets import ONNX_NAME

#: Where a vision-language model's engine directory holds its vision engine directory.
VISUAL_SUBDIR = "visual"
#: Where an engine built from ``lora_model.onnx`` links each processed adapter: ``lora/<adapter name>/``.
LORA_SUBDIR = "lora"
#: Files of an export copied beside the engine when the export has them.
SIDECARS = tuple(
    dict.fromkeys([*(name for kind in EXPORT_KINDS.values() for name in kind.sidecars), "vocab_map.safetensors"])
)


def builder_config_of(kind: ExportKind, limits: BuildLimits, *, deepstack: int = 0) -> dict:
    """``builder_config`` of the engine's config.json: the limits its kind reads, and EAGLE roles.

    A Qwen3-VL language model's also says how many deepstack inputs the engine takes
    (``num_deepstack_features``), which the runtime checks against the engine when it loads it.
    """
    config: dict = {key: getattr(limits, key) for key in LIMITS_READ[kind.profile]}
    if kind.profile == "llm":
        config["eagle_base"] = kind is EAGLE_BASE
        config["eagle_draft"] = kind is DRAFT
        if deepstack:
            config["num_deepstack_features"] = deepstack
    return config


def graph_deepstack_count(onnx_dir: Path) -> int:
    """The deepstack inputs of the export's graph, counted from its inputs (the protobuf alone is read)."""
    graph = onnx.load(str(onnx_dir / ONNX_NAME), load_external_data=False).graph
    return llm_io.deepstack_count([i.name for i in graph.input])


def export_kind_of(onnx_dir: Path) -> ExportKind:
    """The kind of the export in ``onnx_dir``, from its manifest's step and its config's model_type."""
    return kind_of(read_manifest_step(onnx_dir), json.loads((onnx_dir / "config.json").read_text()))


def check_component_engine(engine_dir: Path, sm: int, kind: ExportKind) -> Path:
    """A finished engine directory of ``kind`` built for ``sm``, to be placed into another engine directory."""
    manifest = check_step_output(engine_dir, steps.BUILD_ENGINE)
    built_for = manifest.get("parameters", {}).get("sm")
    if not (engine_dir / kind.engine_file).is_file() or built_for != sm:
        held = sorted(p.name for p in engine_dir.iterdir())
        raise EdgeLLMError(
            f"{engine_dir} is not {kind.description} for sm{sm} (it holds {held}, built for sm{built_for}); "
            "build that engine target first"
        )
    return engine_dir


def _place(source: Path, destination: Path) -> None:
    """A hard link where the file system allows one (an engine is large), else a copy."""
    try:
        os.link(source, destination)
    except OSError:
        shutil.copyfile(source, destination)


def write_engine_dir(
    engine_dir: Path,
    onnx_dir: Path,
    engine: bytes,
    *,
    sm: int,
    limits: BuildLimits,
    visual_engine_dir: Path | None = None,
    draft_engine_dir: Path | None = None,
    lora_adapters: dict[str, Path] | None = None,
) -> Path:
    """Write the runtime's engine directory: the engine, its config, the export's sidecars, ``visual/``,
    and for an EAGLE base the draft engine's files beside its own (``eagle_draft.engine``,
    ``draft_config.json``, ``d2t.safetensors``).

    ``lora_adapters`` (name -> processed adapter directory) become relative links ``lora/<name>``:
    reprocessing an adapter updates what the engine directory serves without rebuilding the engine
    (copy the directory with links dereferenced, e.g. ``cp -rL``, to move it to a device)."""
    export_config = json.loads((onnx_dir / "config.json").read_text())
    kind = export_kind_of(onnx_dir)
    deepstack = graph_deepstack_count(onnx_dir) if kind.profile == "llm" else 0
    builder_config = builder_config_of(kind, limits, deepstack=deepstack)
    with staged_directory(engine_dir) as staging:
        (staging / kind.engine_file).write_bytes(engine)
        config = {**export_config, "builder_config": builder_config}
        (staging / kind.engine_config).write_text(json.dumps(config, indent=2) + "\n")
        for name in SIDECARS:
            if (onnx_dir / name).is_file():
                shutil.copyfile(onnx_dir / name, staging / name)
        parameters: dict = {"sm": sm, **builder_config}
        if visual_engine_dir is not None:
            (staging / VISUAL_SUBDIR).mkdir()
            for source in sorted(visual_engine_dir.iterdir()):
                _place(source, staging / VISUAL_SUBDIR / source.name)
        if draft_engine_dir is not None:
            for source in sorted(draft_engine_dir.iterdir()):
                if source.name != "manifest.json" and not (staging / source.name).exists():
                    _place(source, staging / source.name)
        if lora_adapters:
            (staging / LORA_SUBDIR).mkdir()
            final = Path(os.path.abspath(engine_dir)) / LORA_SUBDIR
            for name, adapter in sorted(lora_adapters.items()):
                (staging / LORA_SUBDIR / name).symlink_to(os.path.relpath(os.path.abspath(adapter), final))
            parameters["lora_adapters"] = sorted(lora_adapters)
        write_manifest(staging, step=steps.BUILD_ENGINE, parameters=parameters)
    return engine_dir
