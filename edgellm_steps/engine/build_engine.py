"""build-engine: an exported ONNX directory -> the runtime's engine directory for one SM target.

The engine directory (the ``.engine`` target) holds ``llm.engine`` (``visual.engine``
for a vision encoder), ``config.json`` (the export's config plus ``builder_config``)
and the export's sidecars. A vision-language model's LLM engine directory also holds
``visual/``: its vision engine directory for the same SM, so the runtime finds both engines
in one place (``--engineDir <dir> --multimodalEngineDir <dir>/visual``). The
build needs TensorRT, the Edge-LLM plugin library (``EDGELLM_PLUGIN_PATH``) and a
visible GPU whose SM equals the target: an engine only runs on the SM it was
built for. Everything that can be checked is checked before the (long) build,
and the directory appears only when complete.
"""

from __future__ import annotations

import ctypes
import importlib.util
import json
import logging
import os
import shutil
import subprocess
from pathlib import Path

import onnx

from edgellm_steps.artifacts.atomic import staged_directory
from edgellm_steps.artifacts.manifest import (
    check_if_step_output,
    check_listed_file,
    check_step_output,
    write_manifest,
)
from edgellm_steps.engine.limits import LIMITS_READ, BuildLimits
from edgellm_steps.engine.profiles import engine_kind, engine_profiles
from edgellm_steps.errors import EdgeLLMError, MissingDependencyError
from edgellm_steps.graph.onnx_builder import ONNX_NAME
from edgellm_steps.lora.insert_lora import LORA_ONNX_NAME, SOURCE_KEY

log = logging.getLogger(__name__)

#: The runtime's file names per engine role: (engine, config). An EAGLE directory holds the base's
#: and the draft's side by side, with the draft's d2t.safetensors.
ROLE_FILES = {
    "llm": ("llm.engine", "config.json"),
    "visual": ("visual.engine", "config.json"),
    "eagle_base": ("eagle_base.engine", "base_config.json"),
    "eagle_draft": ("eagle_draft.engine", "draft_config.json"),
}
_EAGLE_ROLES = {"eagle3_base": "eagle_base", "eagle3_draft": "eagle_draft"}
_ROLE_DESCRIPTIONS = {
    "llm": "an LLM engine",
    "visual": "a vision engine",
    "eagle_base": "an EAGLE base engine",
    "eagle_draft": "an EAGLE draft engine",
}
#: The export step whose output builds each kind of engine.
EXPORT_STEPS = {"export-llm": "llm", "export-draft": "llm", "export-visual": "visual"}
#: Where a vision-language model's engine directory holds its vision engine directory.
VISUAL_SUBDIR = "visual"
#: Where an engine built from ``lora_model.onnx`` links each processed adapter: ``lora/<adapter name>/``.
LORA_SUBDIR = "lora"
SIDECARS = (
    "preprocessor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "processed_chat_template.json",
    "embedding.safetensors",
    "d2t.safetensors",
    "vocab_map.safetensors",
)
PLUGIN_ENV = "EDGELLM_PLUGIN_PATH"


def visible_gpu_sm() -> int | None:
    """SM of the first visible GPU (e.g. 87), or None when there is none."""
    try:
        result = subprocess.run(
            ["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return None
    lines = [line.strip() for line in result.stdout.splitlines() if line.strip()]
    if result.returncode != 0 or not lines:
        return None
    major, _, minor = lines[0].partition(".")
    return int(major) * 10 + int(minor or 0)


def check_build_host(sm: int, plugin_path: str | None) -> Path:
    """Fail in one line, before any work, when this host cannot build for ``sm``; returns the plugin path."""
    allocation = {
        k: os.environ[k] for k in ("CUDA_VISIBLE_DEVICES", "SLURM_JOB_ID", "SLURM_GPUS_ON_NODE") if k in os.environ
    }
    log.info("GPU allocation: %s", " ".join(f"{k}={v}" for k, v in allocation.items()) or "none")
    if importlib.util.find_spec("tensorrt") is None:
        raise MissingDependencyError(
            "TensorRT is not installed on this host: engines build on a GPU machine with "
            "`pip install 'edgellm-steps[engine]'` (or the envs/engine.yaml conda env)"
        )
    visible = visible_gpu_sm()
    if visible is None:
        raise MissingDependencyError(
            f"no NVIDIA GPU is visible here (nvidia-smi found none); build sm{sm} on an SM{sm} GPU"
        )
    if visible != sm:
        raise EdgeLLMError(
            f"the visible GPU is sm{visible} but the target is sm{sm}: an engine runs only on its own SM"
        )
    path = plugin_path or os.environ.get(PLUGIN_ENV)
    if not path or not Path(path).is_file():
        raise MissingDependencyError(
            f"the Edge-LLM plugin library is not found ({PLUGIN_ENV}={path!r}); "
            f"set {PLUGIN_ENV} to libNvInfer_edgellm_plugin.so"
        )
    return Path(path)


def _serialize(onnx_path: Path, profiles: list[dict], plugin: Path) -> bytes:
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    ctypes.CDLL(str(plugin), mode=ctypes.RTLD_GLOBAL)
    trt.init_libnvinfer_plugins(logger, "")
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EdgeLLMError(f"TensorRT cannot parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    for shapes in profiles:
        profile = builder.create_optimization_profile()
        for name, (low, opt, high) in shapes.items():
            profile.set_shape(name, low, opt, high)
        config.add_optimization_profile(profile)
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise EdgeLLMError(f"TensorRT failed to build {onnx_path}; see the TensorRT messages above")
    return bytes(engine)


def builder_config_of(kind: str, limits: BuildLimits, export_config: dict) -> dict:
    """``builder_config`` of the engine's config.json: the limits its kind reads, and EAGLE roles."""
    config: dict = {key: getattr(limits, key) for key in LIMITS_READ[kind]}
    if kind == "llm":
        config["eagle_base"] = export_config.get("model_type") == "eagle3_base"
        config["eagle_draft"] = export_config.get("model_type") == "eagle3_draft"
    return config


def check_export(onnx_dir: Path) -> str:
    """The kind of engine a finished export directory makes (``llm`` or ``visual``), its files checked."""
    for step, kind in EXPORT_STEPS.items():
        if check_if_step_output(onnx_dir, step) is not None:
            return kind
    check_step_output(onnx_dir, "export-llm")  # raises, naming what is wrong
    raise AssertionError("unreachable: check_step_output accepted what check_if_step_output refused")


def engine_role(kind: str, export_config: dict) -> str:
    """``llm``, ``visual``, ``eagle_base`` or ``eagle_draft``: which engine (and file names) an export makes."""
    if kind == "visual":
        return "visual"
    return _EAGLE_ROLES.get(export_config.get("model_type"), "llm")


def check_component_engine(engine_dir: Path, sm: int, role: str) -> Path:
    """A finished engine directory of ``role`` built for ``sm``, to be placed into another engine directory."""
    manifest = check_step_output(engine_dir, "build-engine")
    built_for = manifest.get("parameters", {}).get("sm")
    if not (engine_dir / ROLE_FILES[role][0]).is_file() or built_for != sm:
        held = sorted(p.name for p in engine_dir.iterdir())
        raise EdgeLLMError(
            f"{engine_dir} is not {_ROLE_DESCRIPTIONS[role]} for sm{sm} (it holds {held}, built for sm{built_for}); "
            "build that engine target first"
        )
    return engine_dir


def check_lora_graph(onnx_dir: Path, limits: BuildLimits) -> Path:
    """``lora_model.onnx`` of the finished LLM export ``onnx_dir``, made from its ``model.onnx``, and limits that
    admit LoRA; returns its path."""
    path = onnx_dir / LORA_ONNX_NAME
    if not path.is_file():
        raise EdgeLLMError(f"{onnx_dir} has no {LORA_ONNX_NAME}; run edgellm-insert-lora --onnx_dir {onnx_dir} first")
    # model.onnx alone: check_export has already proven the whole export (the weights are digested once).
    model_digest = check_listed_file(onnx_dir, "export-llm", ONNX_NAME)["files"][ONNX_NAME]["xxh3_128"]
    made_from = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    if made_from.get(SOURCE_KEY) != model_digest:
        raise EdgeLLMError(f"{path} was made from another model.onnx than the export's; run edgellm-insert-lora again")
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
        check_step_output(directory, "process-lora")
        rank = json.loads((directory / "config.json").read_text())["r"]
        if rank > limits.max_lora_rank:
            raise EdgeLLMError(
                f"adapter '{name}' ({directory}) has rank {rank} but the engine's max_lora_rank is "
                f"{limits.max_lora_rank}; raise max_lora_rank"
            )
        checked[name] = directory
    return checked


def check_visual_engine(engine_dir: Path, sm: int) -> Path:
    """A finished vision engine directory built for ``sm``, to be placed into an LLM engine directory."""
    return check_component_engine(engine_dir, sm, "visual")


def _place(source: Path, destination: Path) -> None:
    """A hard link where the file system allows one (an engine is large), else a copy."""
    try:
        os.link(source, destination)
    except OSError:
        shutil.copyfile(source, destination)


def write_engine_dir(
    engine_dir: Path,
    onnx_dir: Path,
    kind: str,
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
    builder_config = builder_config_of(kind, limits, export_config)
    engine_name, config_name = ROLE_FILES[engine_role(kind, export_config)]
    with staged_directory(engine_dir) as staging:
        (staging / engine_name).write_bytes(engine)
        config = {**export_config, "builder_config": builder_config}
        (staging / config_name).write_text(json.dumps(config, indent=2) + "\n")
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
        write_manifest(staging, step="build-engine", parameters=parameters)
    return engine_dir


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
    visual = check_visual_engine(Path(visual_engine_dir), sm) if visual_engine_dir else None
    if visual is not None and kind != "llm":
        raise EdgeLLMError(f"{onnx_dir} is a vision encoder export; only an LLM engine holds a vision engine")
    draft = check_component_engine(Path(draft_engine_dir), sm, "eagle_draft") if draft_engine_dir else None
    role = engine_role(kind, json.loads((onnx_dir / "config.json").read_text()))
    if draft is not None and role != "eagle_base":
        raise EdgeLLMError(f"{onnx_dir} is not an EAGLE base export; only an EAGLE base engine holds a draft engine")
    lora = lora or bool(lora_adapters)
    if lora and role != "llm":
        raise EdgeLLMError(f"{onnx_dir} is not a plain LLM export; LoRA engines build from an export-llm output")
    graph_path = check_lora_graph(onnx_dir, limits) if lora else onnx_dir / ONNX_NAME
    adapters = check_lora_adapters(lora_adapters or {}, limits)
    plugin = check_build_host(sm, plugin_path)
    graph = onnx.load(str(graph_path), load_external_data=False)
    if engine_kind(graph) != kind:
        raise EdgeLLMError(f"{onnx_dir}: its manifest says a {kind} export but the graph makes a {engine_kind(graph)}")
    engine = _serialize(graph_path, engine_profiles(graph, limits), plugin)
    return write_engine_dir(
        engine_dir,
        onnx_dir,
        kind,
        engine,
        sm=sm,
        limits=limits,
        visual_engine_dir=visual,
        draft_engine_dir=draft,
        lora_adapters=adapters,
    )
