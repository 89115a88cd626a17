"""Reading a PEFT LoRA adapter as data: its config, its A/B pairs, and the scaling PEFT applies to each.

PEFT computes y = W x + B(A x) * scaling per adapted Linear, scaling = alpha / r (rsLoRA:
alpha / sqrt(r)), where r and alpha come from ``rank_pattern`` / ``alpha_pattern`` when a
pattern matches the module's name (a regex that must match a whole trailing run of dotted
components), else from ``r`` / ``lora_alpha``. The runtime applies plain LoRA to Linear
weights only, so every adapter feature it cannot apply (DoRA, trained biases, whole modules
saved beside the adapter, LoRA on embeddings) is refused here, naming the key or setting.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgellm_steps.artifacts.sources import read_json_object
from edgellm_steps.errors import SourceError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<side>[AB])\.weight$")
#: The LM head's own weight, which PEFT saves beside a LoRA on it (``save_embedding_layers``) and loads over the
#: model's: a merged adapter's LM head is this weight plus B A.
SAVED_LM_HEAD = f"{PEFT_PREFIX}lm_head.base_layer.weight"


def _without_graph_input(key: str, lm_head: bool = False) -> bool:
    """A key of a norm, or of lm_head unless ``lm_head``: the graph has no LoRA input there (contract 6 drops them)."""
    return any((part == "lm_head" and not lm_head) or "norm" in part for part in key.split("."))


@dataclass(frozen=True)
class AdapterModule:
    """One adapted Linear: its rank and widths, PEFT's scaling of B(A x), and (when read) A [r, in] and B [out, r]."""

    module: str
    rank: int
    in_features: int
    out_features: int
    alpha: float
    scaling: float
    a: torch.Tensor | None = None
    b: torch.Tensor | None = None
    #: The base weight the adapter carries for this module (:data:`SAVED_LM_HEAD`), when read.
    saved_base: torch.Tensor | None = None


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """``patterns``' value for ``module`` (the first pattern matching a trailing run of its components)."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def read_adapter_config(directory: Path) -> dict[str, Any]:
    """``adapter_config.json``, refused in one line when the runtime could not apply the adapter."""
    path = directory / ADAPTER_CONFIG
    if not path.is_file():
        raise SourceError(f"{directory} has no {ADAPTER_CONFIG}; is it a PEFT adapter directory?")
    config = read_json_object(path, what="a PEFT adapter config")
    where = str(directory)
    if (kind := config.get("peft_type")) != "LORA":
        raise SourceError(f"{where}: peft_type {kind!r} is not LORA; only LoRA adapters can be served")
    if config.get("use_dora"):
        raise SourceError(f"{where}: use_dora is set; the runtime applies plain LoRA, not DoRA: train without DoRA")
    if (bias := config.get("bias", "none")) != "none":
        raise SourceError(f"{where}: bias {bias!r} trains biases the runtime cannot apply; train with bias='none'")
    if config.get("modules_to_save"):
        raise SourceError(
            f"{where}: modules_to_save {config['modules_to_save']} saves whole modules beside the adapter, "
            "which the runtime cannot load; train without them or merge the adapter (merge: true)"
        )
    if config.get("fan_in_fan_out"):
        raise SourceError(f"{where}: fan_in_fan_out (Conv1D layers) is not a layout of the supported families")
    return config


def adapter_weight_bytes(directory: str | Path) -> int:
    """The size of an adapter's weights file (a merge job holds them whole)."""
    return (Path(directory) / ADAPTER_WEIGHTS).stat().st_size


def read_adapter(
    directory: str | Path, *, tensors: bool = True, lm_head: bool = False
) -> tuple[dict[str, Any], list[AdapterModule]]:
    """The adapter's config and its adapted modules (named as PEFT names them, ``base_model.model.`` stripped).

    With ``tensors=False`` only the safetensors header is read (planning checks an adapter that way). LoRA on
    lm_head is dropped with a warning (no graph input serves it) unless ``lm_head`` (an adapter merged into
    the weights).
    """
    from edgellm_steps.artifacts.safetensors_io import SafetensorsFile

    directory = Path(directory)
    config = read_adapter_config(directory)
    weights = directory / ADAPTER_WEIGHTS
    if not weights.is_file():
        pickled = directory / "adapter_model.bin"
        hint = f" ({pickled.name} is pickled and is not read: save the adapter with safe_serialization)"
        raise SourceError(f"{directory} has no {ADAPTER_WEIGHTS}{hint if pickled.is_file() else ''}")
    store = SafetensorsFile(weights)
    pairs: dict[str, dict[str, str]] = {}
    names = set(store.names())
    dropped = sorted(k for k in store.names() if k.startswith(PEFT_PREFIX) and _without_graph_input(k, lm_head))
    if dropped:
        log.warning(
            "%s: dropping %d tensors of lm_head / norms (no LoRA input in the graph), e.g. %s",
            directory,
            len(dropped),
            dropped[0],
        )
    for key in sorted(names - set(dropped)):
        if lm_head and key == SAVED_LM_HEAD:
            continue
        match = _LORA_KEY.match(key.removeprefix(PEFT_PREFIX))
        if not key.startswith(PEFT_PREFIX) or match is None:
            raise SourceError(
                f"{directory}: adapter key {key} is not a LoRA A/B weight of a Linear; the runtime applies "
                "LoRA to Linear weights only (no DoRA magnitudes, biases, embedding LoRA or saved modules)"
            )
        pairs.setdefault(match["module"], {})[match["side"]] = key
    modules = []
    for module, pair in sorted(pairs.items()):
        if set(pair) != {"A", "B"}:
            missing = "B" if "A" in pair else "A"
            raise SourceError(f"{directory}: {PEFT_PREFIX}{module}.lora_{missing}.weight is missing")
        a_shape, b_shape = store.shape(pair["A"]), store.shape(pair["B"])
        if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[0] != b_shape[1] or a_shape[0] == 0:
            raise SourceError(
                f"{directory}: {PEFT_PREFIX}{module}: lora_A {a_shape} and lora_B {b_shape} "
                "are not [r, in] and [out, r]"
            )
        rank = int(a_shape[0])
        configured = int(_pattern_value(config.get("rank_pattern") or {}, module, config.get("r", rank)))
        if configured != rank:
            raise SourceError(f"{directory}: {module} has rank {rank} but its config says r = {configured}")
        alpha = float(_pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", rank)))
        scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        a, b = (store.read(pair["A"]), store.read(pair["B"])) if tensors else (None, None)
        saved = f"{PEFT_PREFIX}{module}.base_layer.weight"
        base = store.read(saved) if tensors and lm_head and saved == SAVED_LM_HEAD and saved in names else None
        modules.append(AdapterModule(module, rank, int(a_shape[1]), int(b_shape[0]), alpha, scaling, a, b, base))
    if not modules:
        left = " once lm_head and norm tensors are dropped" if dropped else ""
        raise SourceError(f"{directory}: {ADAPTER_WEIGHTS} holds no LoRA weights{left}")
    return config, modules
