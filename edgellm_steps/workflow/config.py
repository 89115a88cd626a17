"""Workflow configuration: schema validation and per-model settings.

The schema (``config/config.schema.yaml``) documents every key and its default;
this module validates a loaded config against it and resolves what one model
gets after inheriting ``defaults``.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from edgellm_steps.artifacts.signatures import SignatureSpec, signature_spec
from edgellm_steps.engine.limits import BuildLimits
from edgellm_steps.errors import ConfigError

SCHEMA_PATH = Path(__file__).resolve().parents[2] / "config" / "config.schema.yaml"


@dataclass(frozen=True)
class QuantizationSettings:
    """Calibration settings of quantize-llm."""

    calib_size: int
    calib_max_tokens: int
    batch_size: int | None
    dataset: str | None
    device: str
    #: CPU threads of a quantize job (Snakemake's ``threads``; not part of what is built).
    threads: int
    #: Decoder Linears kept in float in every quantized precision (shell-style patterns of stored module names).
    exclude: tuple[str, ...] = ()


@dataclass(frozen=True)
class ExportSettings:
    """How export jobs run (not part of what they write)."""

    #: CPU threads of an export job (Snakemake's ``threads``).
    threads: int


@dataclass(frozen=True)
class VerifySettings:
    """How verify-onnx jobs run (not part of what they check)."""

    #: CPU threads of a verify job (Snakemake's ``threads``).
    threads: int


@dataclass(frozen=True)
class AccuracySettings:
    """What the accuracy report measures on (part of what it reports: a change reruns it)."""

    #: Held-out text: None for the built-in corpus's held-out split, else a local file or directory.
    dataset: str | None
    samples: int
    tokens: int


@dataclass(frozen=True)
class DraftSettings:
    """An EAGLE3 draft configured for a model."""

    source: str
    precision: str = "fp16"
    signature: SignatureSpec | None = None


@dataclass(frozen=True)
class LoraAdapter:
    """A LoRA adapter configured for a model."""

    source: str
    merge: bool = False
    signature: SignatureSpec | None = None


@dataclass(frozen=True)
class ReducedVocab:
    """A reduced vocabulary for a model's LLM exports."""

    size: int
    corpus: str | None = None


@dataclass(frozen=True)
class ModelSettings:
    """Everything the workflow knows about one model after defaults apply."""

    name: str
    source: str
    precisions: tuple[str, ...]
    sm_targets: tuple[int, ...]
    chat_template: str | None
    #: Vision-language models: the vision encoder's precision (fp16 or fp8), not the LLM's.
    visual_precision: str
    #: The model's EAGLE3 draft, if any.
    draft: DraftSettings | None
    #: The reduced vocabulary of its LLM exports, if any.
    reduced_vocab: ReducedVocab | None
    #: LoRA adapters its engines serve, by name.
    lora: dict[str, LoraAdapter]
    build: BuildLimits
    quantization: QuantizationSettings
    export: ExportSettings
    verify: VerifySettings
    accuracy: AccuracySettings
    #: The source's model-signing signature, verified before any step reads the source.
    signature: SignatureSpec | None = None

    @property
    def default_sm(self) -> int:
        return self.sm_targets[0]


@functools.cache
def load_schema(path: Path = SCHEMA_PATH) -> dict[str, Any]:
    """The parsed schema, read once per process (every plan validates against it): callers must not modify it."""
    with open(path, encoding="utf-8") as handle:
        return yaml.load(handle, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


def _location(error: jsonschema.ValidationError) -> str:
    parts = []
    for part in error.absolute_path:
        parts.append(f"[{part}]" if isinstance(part, int) else f".{part}")
    return "".join(parts).lstrip(".") or "(top level)"


def validate_config(config: dict[str, Any], schema: dict[str, Any] | None = None) -> None:
    """Raise :class:`ConfigError` naming the first offending key of ``config``."""
    schema = schema if schema is not None else load_schema()
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(config), key=lambda e: list(e.absolute_path))
    if errors:
        error = jsonschema.exceptions.best_match(errors)
        raise ConfigError(
            f"invalid config at {_location(error)}: {error.message}; "
            "fix it in your config file (keys and defaults: config/config.schema.yaml)"
        )


def _schema_default_settings(schema: dict[str, Any]) -> dict[str, Any]:
    """Defaults of every setting; nested objects (``build``, ``quantization``, ...) get their members' defaults.

    A member without one (a vision engine's image-token limits, whose default depends on the tower) is None.
    """
    defaults = {}
    for key, spec in schema["$defs"]["settings"]["properties"].items():
        if "$ref" in spec:
            nested = schema["$defs"][spec["$ref"].rsplit("/", 1)[-1]]["properties"]
            defaults[key] = {name: member.get("default") for name, member in nested.items()}
        else:
            defaults[key] = spec.get("default")
    return defaults


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _signed(entry: dict[str, Any], where: str) -> dict[str, Any]:
    """A draft or adapter entry with its ``signature`` object parsed."""
    return {**entry, "signature": signature_spec(entry.get("signature"), where)}


def model_settings(config: dict[str, Any], name: str, schema: dict[str, Any] | None = None) -> ModelSettings:
    """Settings of model ``name``: schema defaults < ``defaults:`` < the model's entry."""
    models = config.get("models") or {}
    if name not in models:
        known = ", ".join(sorted(models)) or "(none)"
        raise ConfigError(
            f"unknown model '{name}' in target: the config defines {known}; "
            f"add '{name}' under models: in your config file or fix the target path"
        )
    schema = schema if schema is not None else load_schema()
    merged = _merge(_schema_default_settings(schema), config.get("defaults") or {})
    merged = _merge(merged, models[name])
    return ModelSettings(
        name=name,
        source=merged["source"],
        precisions=tuple(merged["precisions"]),
        sm_targets=tuple(merged["sm_targets"]),
        chat_template=merged["chat_template"],
        visual_precision=merged["visual_precision"],
        draft=DraftSettings(**_signed(merged["draft"], f"model '{name}' draft")) if merged["draft"] else None,
        reduced_vocab=ReducedVocab(**merged["reduced_vocab"]) if merged["reduced_vocab"] else None,
        lora={
            adapter: LoraAdapter(source=entry)
            if isinstance(entry, str)
            else LoraAdapter(**_signed(entry, f"model '{name}' adapter '{adapter}'"))
            for adapter, entry in (merged["lora"] or {}).items()
        },
        build=BuildLimits(**merged["build"]),
        quantization=QuantizationSettings(
            **{**merged["quantization"], "exclude": tuple(merged["quantization"]["exclude"])}
        ),
        export=ExportSettings(**merged["export"]),
        verify=VerifySettings(**merged["verify"]),
        accuracy=AccuracySettings(**merged["accuracy"]),
        signature=signature_spec(merged.get("signature"), f"model '{name}'"),
    )
