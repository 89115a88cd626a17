"""Reading a PEFT LoRA adapter as data: its config, its A/B pairs, and the scaling PEFT applies to each.

PEFT computes y = W x + B(A x) * scaling per adapted Linear, scaling = alpha / r (rsLoRA:
alpha / sqrt(r)), where r and alpha come from ``rank_pattern`` / ``alpha_pattern`` when a
pattern matches the module's name (a regex that must match a whole trailing run of dotted
components), else from ``r`` / ``lora_alpha``. The runtime applies plain LoRA to Linear
weights only, so every adapter feature it cannot apply (DoRA, trained biases, whole modules
saved beside the adapter, LoRA on embeddings) is refused here, naming the key or setting.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from edgellm_steps.errors import SourceError

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<side>[AB])\.weight$")


@dataclass(frozen=True)
class AdapterModule:
    """One adapted Linear: A [r, in], B [out, r] as PEFT stores them, and PEFT's scaling of B(A x)."""

    module: str
    a: torch.Tensor
    b: torch.Tensor
    rank: int
    alpha: float
    scaling: float


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
    config = json.loads(path.read_text())
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


def read_adapter(directory: str | Path) -> tuple[dict[str, Any], list[AdapterModule]]:
    """The adapter's config and its adapted modules (named as PEFT names them, ``base_model.model.`` stripped)."""
    from safetensors.torch import load_file

    directory = Path(directory)
    config = read_adapter_config(directory)
    weights = directory / ADAPTER_WEIGHTS
    if not weights.is_file():
        pickled = directory / "adapter_model.bin"
        hint = f" ({pickled.name} is pickled and is not read: save the adapter with safe_serialization)"
        raise SourceError(f"{directory} has no {ADAPTER_WEIGHTS}{hint if pickled.is_file() else ''}")
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in load_file(str(weights)).items():
        match = _LORA_KEY.match(key.removeprefix(PEFT_PREFIX))
        if not key.startswith(PEFT_PREFIX) or match is None:
            raise SourceError(
                f"{directory}: adapter key {key} is not a LoRA A/B weight of a Linear; the runtime applies "
                "LoRA to Linear weights only (no DoRA magnitudes, biases, embedding LoRA or saved modules)"
            )
        pairs.setdefault(match["module"], {})[match["side"]] = tensor
    modules = []
    for module, pair in sorted(pairs.items()):
        if set(pair) != {"A", "B"}:
            missing = "B" if "A" in pair else "A"
            raise SourceError(f"{directory}: {PEFT_PREFIX}{module}.lora_{missing}.weight is missing")
        a, b = pair["A"], pair["B"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1] or a.shape[0] == 0:
            raise SourceError(
                f"{directory}: {PEFT_PREFIX}{module}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} "
                "are not [r, in] and [out, r]"
            )
        rank = int(a.shape[0])
        configured = int(_pattern_value(config.get("rank_pattern") or {}, module, config.get("r", rank)))
        if configured != rank:
            raise SourceError(f"{directory}: {module} has rank {rank} but its config says r = {configured}")
        alpha = float(_pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", rank)))
        scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        modules.append(AdapterModule(module, a, b, rank, alpha, scaling))
    if not modules:
        raise SourceError(f"{directory}: {ADAPTER_WEIGHTS} holds no LoRA weights")
    return config, modules
