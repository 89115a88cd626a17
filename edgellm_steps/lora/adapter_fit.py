"""Whether a LoRA adapter fits a model: its modules against the model's GEMMs, from configs and headers only.

Planning asks this before anything runs (no tensor is read, no torch imported); process-lora
and verify-onnx ask it again on the adapter they read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgellm_steps.artifacts.checkpoint import decoder_dims
from edgellm_steps.errors import SourceError
from edgellm_steps.lora.peft_adapter import PEFT_PREFIX, AdapterModule, read_adapter
from edgellm_steps.models.families import family_for

#: The module PEFT names the LM head by: merge-lora folds LoRA on it into the weights; served LoRA has no input there.
LM_HEAD = "lm_head"


def graph_module(peft_module: str) -> str:
    """The graph's module path of a PEFT module key (``base_model.model.`` already stripped)."""
    return peft_module if peft_module.startswith("model.") or peft_module == LM_HEAD else f"model.{peft_module}"


def adaptable_gemms(model_config: dict[str, Any], where: str, *, merge: bool = False) -> dict[str, tuple[int, int]]:
    """The GEMMs of a model's LLM graph that an adapter may adapt: module -> (in_features, out_features).

    A vision-language model takes no served LoRA; one whose family merges its own adapters (Phi-4-multimodal's
    vision LoRA) takes them with ``merge``. A merged adapter may adapt the LM head too.
    """
    spec = family_for(model_config, where=where)
    if spec.vision_language and not (merge and spec.vision_lora is not None):
        how = "served on" if spec.vision_lora is not None else "on"
        raise SourceError(f"{where}: LoRA {how} a vision-language model ({spec.family}) is not supported")
    dims = decoder_dims(model_config)
    lm_head = {LM_HEAD: (dims.hidden_size, dims.vocab_size)} if merge and not dims.tie_word_embeddings else {}
    return {**spec.linear_shapes(dims), **lm_head}


def check_adapter_fits(modules: list[AdapterModule], gemms: dict[str, tuple[int, int]], where: str) -> None:
    """Refuse, naming the key, an adapted module that is not one of ``gemms`` or has other shapes."""
    for m in modules:
        name = graph_module(m.module)
        key = f"{PEFT_PREFIX}{m.module}.lora_A.weight"
        if name == LM_HEAD and name not in gemms:
            raise SourceError(
                f"{where}: adapter key {key} adapts lm_head, which this model ties to its embedding table (a LoRA "
                "there would change the embeddings too); train the adapter without lm_head"
            )
        if name not in gemms:
            raise SourceError(
                f"{where}: adapter key {key} targets {name}, which is not a LoRA input of the model's graph "
                f"(its GEMMs are e.g. {next(iter(gemms))}); was the adapter trained for another model?"
            )
        shape = (m.in_features, m.out_features)
        if shape != gemms[name]:
            raise SourceError(
                f"{where}: adapter key {key} adapts {name} as {shape[0]} -> {shape[1]}, but the model's is "
                f"{gemms[name][0]} -> {gemms[name][1]}; was the adapter trained for another model?"
            )


def read_fitting_adapter(
    adapter: Path,
    model_config: dict[str, Any] | None,
    model_where: str = "",
    *,
    tensors: bool = True,
    merge: bool = False,
) -> tuple[dict[str, Any], list[AdapterModule]]:
    """The adapter's config and modules (norm tensors dropped, and lm_head ones unless ``merge``), checked against
    the model if given (``merge``: to be folded into its weights rather than served)."""
    config, modules = read_adapter(adapter, tensors=tensors, lm_head=merge)
    if model_config is not None:
        check_adapter_fits(modules, adaptable_gemms(model_config, model_where, merge=merge), str(adapter))
    return config, modules
