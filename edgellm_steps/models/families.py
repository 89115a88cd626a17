"""One declarative spec per supported model family, found through one registry.

A spec says how a family's HF checkpoint maps onto the Edge-LLM decoder graph:
its architecture class names, the family name the runtime config records, and
the few structural switches that differ between families. Which optional
tensors exist (q/k/v biases, o_proj bias) is read from the checkpoint itself.
Adding a family is adding one entry to :data:`FAMILIES`.
"""

from __future__ import annotations

from dataclasses import dataclass

from edgellm_steps.errors import UnsupportedArchitectureError


@dataclass(frozen=True)
class FamilySpec:
    """How one HF decoder family is exported."""

    #: Value of ``model`` in the exported ``config.json``.
    family: str
    #: HF ``architectures`` entries that belong to this family.
    architectures: tuple[str, ...]
    #: Per-head RMSNorm on Q and K before RoPE (Qwen3).
    qk_norm: bool = False
    #: Q, K and V come from one ``self_attn.qkv_proj`` (Phi-3) instead of three projections.
    fused_qkv: bool = False
    #: Gate and up come from one ``mlp.gate_up_proj`` (gate rows first) instead of two.
    fused_gate_up: bool = False
    #: Activation of the gated MLP (HF ``hidden_act``).
    activation: str = "silu"
    #: Weight name templates; ``{i}`` is the decoder layer index.
    embed_tokens: str = "model.embed_tokens.weight"
    layer_prefix: str = "model.layers.{i}"
    final_norm: str = "model.norm.weight"
    lm_head: str = "lm_head.weight"


FAMILIES: tuple[FamilySpec, ...] = (
    FamilySpec(family="llama", architectures=("LlamaForCausalLM",)),
    # Qwen2 and Qwen2.5 share the class; DeepSeek-R1-Distill-Qwen ships as Qwen2ForCausalLM.
    FamilySpec(family="qwen2", architectures=("Qwen2ForCausalLM",)),
    FamilySpec(family="qwen3", architectures=("Qwen3ForCausalLM",), qk_norm=True),
    # Phi-3 and Phi-4-mini: fused projections and partial rotary embeddings.
    FamilySpec(family="phi3", architectures=("Phi3ForCausalLM",), fused_qkv=True, fused_gate_up=True),
)

_BY_ARCHITECTURE = {arch: spec for spec in FAMILIES for arch in spec.architectures}


def supported_architectures() -> list[str]:
    return sorted(_BY_ARCHITECTURE)


def family_for(hf_config: dict, *, where: str = "checkpoint") -> FamilySpec:
    """The spec for a checkpoint's ``config.json``, or a one-line error listing the supported ones."""
    architectures = hf_config.get("architectures") or []
    for arch in architectures:
        if arch in _BY_ARCHITECTURE:
            return _BY_ARCHITECTURE[arch]
    found = ", ".join(architectures) if architectures else f"none (model_type {hf_config.get('model_type')!r})"
    raise UnsupportedArchitectureError(
        f"{where}: unsupported architecture {found}; supported: {', '.join(supported_architectures())}"
    )
