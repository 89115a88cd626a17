"""One declarative spec per supported model family, found through one registry.

A spec says how a family's HF checkpoint maps onto the Edge-LLM decoder graph:
its architecture class names, the family name the runtime config records, and
the few structural switches that differ between families. Which optional
tensors exist (q/k/v biases, o_proj bias) is read from the checkpoint itself.
Adding a family is adding one entry to :data:`FAMILIES`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from edgellm_steps.errors import SourceError, UnsupportedArchitectureError

if TYPE_CHECKING:
    from edgellm_steps.artifacts.checkpoint import DecoderDims


@dataclass(frozen=True)
class VisionSpec:
    """How a VLM family's vision tower becomes the vision-encoder graph (contract section 7).

    Sizes come from the checkpoint's ``vision_config``; this says which structure they fill.
    """

    #: Norms of the blocks and the merger's ``ln_q``: ``rms`` (RMSNorm) or ``layer`` (LayerNorm with bias).
    norm: str
    #: The block MLP: ``gate_proj`` / ``up_proj`` / ``down_proj`` with biases, or ``fc1`` / ``fc2``.
    gated_mlp: bool
    #: Blocks not in ``fullatt_block_indexes`` attend within windows: the graph takes the window inputs.
    window_attention: bool
    #: ``vision_config`` keys of the blocks' width and of the merger's output width (the decoder's); no output
    #: key when a projector outside the tower outputs the decoder's width by construction (InternVL).
    width_key: str
    out_width_key: str | None
    #: The transformers class of the tower alone (module path and class name): calibration and the
    #: reference load just the tower, never the language model.
    hf_tower_class: str
    #: Where the tower's tensors may live: transformers 4.x and 5 save ``visual.*``; checkpoints
    #: saved from the 4.5x in-memory layout hold ``model.visual.*``.
    prefixes: tuple[str, ...] = ("visual.", "model.visual.")
    #: Qwen3-VL's tower: a learned position embedding mixed bilinearly, ``linear_fc1`` / ``linear_fc2``
    #: MLPs, and deepstack mergers on the outputs of ``deepstack_visual_indexes`` (contract 7.2).
    deepstack: bool = False
    #: The tensor (under one of :attr:`prefixes`) that locates the tower in a checkpoint.
    probe: str = "patch_embed.proj.weight"
    #: A tower that takes whole tiles [blocks, 3, S, S] and gives 256 rows of the decoder's width per tile, named
    #: by its layout (``models/tile_geometry.py``): ``internvl`` (contract 7.3: InternViT with a CLS token, pixel
    #: shuffle 0.5, an MLP projector) or ``phi4mm`` (7.4: SigLIP, 2 x 2 average pooling, the image projection).
    #: The projector lives outside the tower, under :attr:`projector_prefixes`.
    tiles: str | None = None
    projector_prefixes: tuple[str, ...] = ()

    @property
    def tiled(self) -> bool:
        return self.tiles is not None


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
    #: Where the decoder's weights may live: the leading ``model.`` of :attr:`embed_tokens`,
    #: :attr:`layer_prefix` and :attr:`final_norm` is replaced by the first of these whose
    #: embedding table the checkpoint holds (:meth:`resolved`). Other tensors (a vision tower)
    #: are never read by export-llm.
    text_prefixes: tuple[str, ...] = ("model.",)
    #: Multimodal RoPE (Qwen2-VL / Qwen2.5-VL): the runtime fills a rope table per sequence
    #: (``rope_rotary_cos_sin`` batch dim B) and ``config.json`` carries ``mrope_section``.
    mrope: bool = False
    #: A vision-language model: ``config.json`` carries every top-level ``*_token_id(s)`` key of
    #: the HF config (image, video and vision start/end tokens), contract section 4.
    vision_language: bool = False
    #: The transformers auto class that loads the whole checkpoint (quantize-llm, the parity reference).
    hf_auto_class: str = "AutoModelForCausalLM"
    #: ModelOpt quantizer name patterns quantize-llm leaves disabled: modules that are not the
    #: decoder's (a VLM's vision tower stays float; export-visual handles it).
    quant_exclude: tuple[str, ...] = ()
    #: (stored prefix, module prefix) pairs: how transformers renames the checkpoint's tensors onto
    #: its modules when it loads them (a VLM's ``model.layers.*`` become ``model.language_model.layers.*``).
    #: The parity reference loads ModelOpt's quantizer tensors through the same renaming.
    hf_renames: tuple[tuple[str, str], ...] = ()
    #: The vision tower export-visual exports (vision-language families only).
    vision: VisionSpec | None = None
    #: (decoder prefix, LM head name) pairs: where the LM head lives for each of :attr:`text_prefixes` when not
    #: at :attr:`lm_head` (InternVL's ``-hf`` layout keeps it at ``language_model.lm_head.weight``).
    lm_head_for: tuple[tuple[str, str], ...] = ()
    #: The ``text_config.model_type`` values whose decoder this family's graph is (empty: not checked). A
    #: composite class such as InternVL's carries other decoders too (InternVL3.5's Qwen3), which would export
    #: without their q/k norms.
    text_model_types: tuple[str, ...] = ()
    #: The adapter directory a checkpoint of this family ships for image prompts (Phi-4-multimodal's
    #: ``vision-lora``): its language model answers images only with it merged, so an engine is built only for
    #: the variant that merges it (``lora: {vision: {source: <checkpoint>/vision-lora, merge: true}}``).
    vision_lora: str | None = None

    def engine_refusal(self, merged_adapter: str | None) -> str | None:
        """Why no engine of this family's model can be built, given the source of the adapter merged into it."""
        if self.vision_lora is None or (merged_adapter is not None and Path(merged_adapter).name == self.vision_lora):
            return None
        return (
            f"a {self.family} engine answers image prompts only with the checkpoint's {self.vision_lora}/ merged "
            f"into its language model; add lora: {{vision: {{source: <checkpoint>/{self.vision_lora}, merge: true}}}} "
            "and build the engine of <model>+vision"
        )

    def check_text_model(self, hf_config: dict) -> None:
        """Refuse, in one line, a composite checkpoint whose decoder is not the one this family's graph builds."""
        if not self.text_model_types:
            return
        found = (hf_config.get("text_config") or {}).get("model_type")
        if found not in self.text_model_types:
            raise SourceError(
                f"{self.family} checkpoints with a {found!r} language model are not supported (text_config.model_type "
                f"must be {' or '.join(map(repr, self.text_model_types))})"
            )

    def check_dims(self, dims: DecoderDims) -> None:
        """Refuse, in one line, a decoder config this family's graph cannot express (checked at planning too)."""
        if dims.hidden_act != self.activation:
            raise SourceError(f"hidden_act {dims.hidden_act!r} is not supported (the family uses {self.activation!r})")
        if self.mrope:
            section = (dims.rope_scaling or {}).get("mrope_section")
            if not section or sum(section) * 2 != dims.rotary_dim:
                raise SourceError(
                    f"{self.family} uses MRoPE: its rope config needs an mrope_section summing to half the rotary dim "
                    f"{dims.rotary_dim}, got {section!r}"
                )
        if dims.num_heads % dims.num_kv_heads:
            raise SourceError(
                f"num_attention_heads {dims.num_heads} is not a multiple of num_key_value_heads {dims.num_kv_heads}"
            )
        if dims.rotary_dim % 2:
            raise SourceError(f"rotary dim {dims.rotary_dim} (head_dim x partial_rotary_factor) must be even")

    def linear_shapes(self, dims: DecoderDims) -> dict[str, tuple[int, int]]:
        """Every decoder GEMM: module path -> (in_features, out_features), the layers in order.

        These are the GEMMs LoRA may adapt (lm_head excepted), named as the checkpoint and PEFT
        name them: fused families (Phi-3) have ``qkv_proj`` and ``gate_up_proj``, the others
        ``q_proj`` / ``k_proj`` / ``v_proj`` and ``gate_proj`` / ``up_proj``.
        """
        h, inter = dims.hidden_size, dims.intermediate_size
        q, kv = dims.num_heads * dims.head_dim, dims.num_kv_heads * dims.head_dim
        if self.fused_qkv:
            attention = {"qkv_proj": (h, q + 2 * kv)}
        else:
            attention = {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv)}
        attention["o_proj"] = (q, h)
        mlp = (
            {"gate_up_proj": (h, 2 * inter)} if self.fused_gate_up else {"gate_proj": (h, inter), "up_proj": (h, inter)}
        )
        mlp["down_proj"] = (inter, h)
        shapes = {}
        for layer in range(dims.num_layers):
            prefix = self.layer_prefix.format(i=layer)
            shapes.update({f"{prefix}.self_attn.{name}": shape for name, shape in attention.items()})
            shapes.update({f"{prefix}.mlp.{name}": shape for name, shape in mlp.items()})
        return shapes

    def resolved(self, names: Iterable[str]) -> FamilySpec:
        """This spec with its decoder weight names matched to a checkpoint holding tensors ``names``."""
        if self.text_prefixes == ("model.",):
            return self
        present = set(names)
        suffix = self.embed_tokens.removeprefix("model.")
        for prefix in self.text_prefixes:
            if prefix + suffix in present:
                return replace(
                    self,
                    embed_tokens=prefix + suffix,
                    layer_prefix=prefix + self.layer_prefix.removeprefix("model."),
                    final_norm=prefix + self.final_norm.removeprefix("model."),
                    lm_head=dict(self.lm_head_for).get(prefix, self.lm_head),
                    text_prefixes=(prefix,),
                )
        tried = ", ".join(prefix + suffix for prefix in self.text_prefixes)
        raise SourceError(f"checkpoint holds no decoder embedding table (looked for {tried}); is it complete?")


#: What Qwen2-VL and Qwen2.5-VL share: their language models differ only in the vision tower.
_QWEN_VL = {
    "text_prefixes": ("model.", "model.language_model."),
    "mrope": True,
    "vision_language": True,
    "hf_auto_class": "AutoModelForImageTextToText",
    "quant_exclude": ("*visual*",),
    "hf_renames": (("model.", "model.language_model."), ("visual.", "model.visual.")),
}

FAMILIES: tuple[FamilySpec, ...] = (
    FamilySpec(family="llama", architectures=("LlamaForCausalLM",)),
    # Qwen2 and Qwen2.5 share the class; DeepSeek-R1-Distill-Qwen ships as Qwen2ForCausalLM.
    FamilySpec(family="qwen2", architectures=("Qwen2ForCausalLM",)),
    FamilySpec(family="qwen3", architectures=("Qwen3ForCausalLM",), qk_norm=True),
    # Phi-3 and Phi-4-mini: fused projections and partial rotary embeddings.
    FamilySpec(family="phi3", architectures=("Phi3ForCausalLM",), fused_qkv=True, fused_gate_up=True),
    # Vision-language models: export-llm exports their language model (a Qwen2 decoder with
    # MRoPE); the vision tower (``visual.*`` / ``model.visual.*``) is left to export-visual.
    # transformers 4.x and 5.x save the decoder as ``model.layers.*``; checkpoints saved from the
    # 4.5x in-memory layout hold ``model.language_model.layers.*``.
    # Qwen2-VL's tower: LayerNorm, fc1 / fc2 MLP, full attention everywhere; its merger outputs
    # vision_config.hidden_size. Qwen2.5-VL's: RMSNorm, gated MLP, windowed attention.
    FamilySpec(
        family="qwen2_vl",
        architectures=("Qwen2VLForConditionalGeneration",),
        vision=VisionSpec(
            norm="layer",
            gated_mlp=False,
            window_attention=False,
            width_key="embed_dim",
            out_width_key="hidden_size",
            hf_tower_class="transformers.models.qwen2_vl.modeling_qwen2_vl.Qwen2VisionTransformerPretrainedModel",
        ),
        **_QWEN_VL,
    ),
    FamilySpec(
        family="qwen2_5_vl",
        architectures=("Qwen2_5_VLForConditionalGeneration",),
        vision=VisionSpec(
            norm="rms",
            gated_mlp=True,
            window_attention=True,
            width_key="hidden_size",
            out_width_key="out_hidden_size",
            hf_tower_class=(
                "transformers.models.qwen2_5_vl.modeling_qwen2_5_vl.Qwen2_5_VisionTransformerPretrainedModel"
            ),
        ),
        **_QWEN_VL,
    ),
    # Qwen3-VL (contract 3.6): a Qwen3 decoder (q/k norms) with interleaved MRoPE whose first layers
    # add the deepstack inputs; transformers 4.57+ and 5.x save it as model.language_model.* and
    # model.visual.*, the names its modules have.
    FamilySpec(
        family="qwen3_vl",
        architectures=("Qwen3VLForConditionalGeneration",),
        qk_norm=True,
        text_prefixes=("model.language_model.",),
        mrope=True,
        vision_language=True,
        hf_auto_class="AutoModelForImageTextToText",
        quant_exclude=("*visual*",),
        vision=VisionSpec(
            norm="layer",
            gated_mlp=False,
            window_attention=False,
            width_key="hidden_size",
            out_width_key="out_hidden_size",
            hf_tower_class="transformers.models.qwen3_vl.modeling_qwen3_vl.Qwen3VLVisionModel",
            prefixes=("model.visual.", "visual."),
            deepstack=True,
        ),
    ),
)

# InternVL3 (transformers' ``-hf`` layout, contract 7.3): a plain Qwen2 / Qwen2.5 decoder (no MRoPE) stored as
# ``language_model.model.*`` with its LM head at ``language_model.lm_head.weight`` (absent when tied), InternViT
# at ``vision_tower.*`` and the projector at ``multi_modal_projector.*``; transformers 5 loads them as
# ``model.language_model.*``, ``lm_head``, ``model.vision_tower.*`` and ``model.multi_modal_projector.*``.
FAMILIES += (
    FamilySpec(
        family="internvl",
        architectures=("InternVLForConditionalGeneration",),
        text_prefixes=("language_model.model.", "model.language_model."),
        lm_head_for=(("language_model.model.", "language_model.lm_head.weight"),),
        text_model_types=("qwen2",),
        vision_language=True,
        hf_auto_class="AutoModelForImageTextToText",
        quant_exclude=("*vision_tower*", "*multi_modal_projector*"),
        hf_renames=(
            ("language_model.model.", "model.language_model."),
            ("language_model.lm_head.", "lm_head."),
            ("vision_tower.", "model.vision_tower."),
            ("multi_modal_projector.", "model.multi_modal_projector."),
        ),
        vision=VisionSpec(
            norm="layer",  # or RMSNorm: each checkpoint's vision_config.norm_type says
            gated_mlp=False,
            window_attention=False,
            width_key="hidden_size",
            out_width_key=None,
            hf_tower_class="transformers.models.internvl.modeling_internvl.InternVLVisionModel",
            prefixes=("vision_tower.", "model.vision_tower."),
            probe="embeddings.patch_embeddings.projection.weight",
            tiles="internvl",
            projector_prefixes=("multi_modal_projector.", "model.multi_modal_projector."),
        ),
    ),
)

# Phi-4-multimodal as transformers 5 loads it natively (contract 7.4): the Phi-4-mini decoder (fused qkv /
# gate_up, LongRoPE) at ``model.*``; the SigLIP tower, its image projection and the separators at
# ``model.embed_tokens_extend.image_embed.*``; an audio encoder the exports never read.
FAMILIES += (
    FamilySpec(
        family="phi4mm",
        architectures=("Phi4MultimodalForCausalLM",),
        fused_qkv=True,
        fused_gate_up=True,
        vision_language=True,
        quant_exclude=("*embed_tokens_extend*",),
        vision_lora="vision-lora",
        vision=VisionSpec(
            norm="layer",
            gated_mlp=False,
            window_attention=False,
            width_key="hidden_size",
            out_width_key=None,
            hf_tower_class="transformers.models.siglip.modeling_siglip.SiglipVisionModel",
            prefixes=("model.embed_tokens_extend.image_embed.img_processor.",),
            probe="embeddings.patch_embedding.weight",
            tiles="phi4mm",
            projector_prefixes=("model.embed_tokens_extend.image_embed.",),
        ),
    ),
)

_BY_ARCHITECTURE = {arch: spec for spec in FAMILIES for arch in spec.architectures}

#: EAGLE3 drafts as published: one Llama-style decoder layer named ``midlayer`` (q/k/v biases, as
#: Qwen-style drafts have, are read when present), ``fc``, ``norm``, ``lm_head`` over the draft
#: vocabulary, and optionally ``embed_tokens`` (the runtime looks tokens up in the base's table).
EAGLE3_DRAFT = FamilySpec(
    family="llama",
    architectures=("LlamaForCausalLMEagle3", "Eagle3LlamaForCausalLM", "LlamaEagle3ForCausalLM"),
    embed_tokens="embed_tokens.weight",
    layer_prefix="midlayer",
    final_norm="norm.weight",
)


#: The rotary geometry the runtime's interleaved-MRoPE kernel supports (contract 3.6): rotary dim 128 with
#: sections [24, 20, 20], every published Qwen3-VL size. Another exports and builds but would rotate wrongly.
INTERLEAVED_MROPE_RUNTIME = (128, (24, 20, 20))


def runtime_rope_warning(dims: DecoderDims) -> str | None:
    """Why the runtime would rotate this interleaved-MRoPE model's text wrongly, or None when it would not."""
    scaling = dims.rope_scaling or {}
    if not scaling.get("mrope_interleaved"):
        return None
    rotary, sections = INTERLEAVED_MROPE_RUNTIME
    found = (dims.rotary_dim, tuple(scaling.get("mrope_section") or ()))
    if found == (rotary, sections):
        return None
    return (
        f"rotary dim {found[0]} with mrope_section {list(found[1])}: the Edge-LLM runtime's interleaved MRoPE "
        f"kernel supports rotary dim {rotary} with sections {list(sections)} only, so its engine would rotate "
        "image positions wrongly (the export and its verify are still right)"
    )


def supported_architectures() -> list[str]:
    return sorted(_BY_ARCHITECTURE)


#: Architectures of a supported model saved in another layout: what to run to get the supported one.
CONVERT_FIRST = {
    "Phi4MMForCausalLM": (
        "this is Phi-4-multimodal's remote-code layout; convert it to transformers' native Phi4MultimodalForCausalLM "
        "layout with transformers' convert_phi4_multimodal_weights_to_hf.py (src/transformers/models/"
        "phi4_multimodal/ in its source tree) and point source at the converted directory"
    ),
}


def family_for(hf_config: dict, *, where: str = "checkpoint") -> FamilySpec:
    """The spec for a checkpoint's ``config.json``, or a one-line error listing the supported ones."""
    architectures = hf_config.get("architectures") or []
    for arch in architectures:
        if arch in _BY_ARCHITECTURE:
            return _BY_ARCHITECTURE[arch]
        if arch in CONVERT_FIRST:
            raise UnsupportedArchitectureError(f"{where}: unsupported architecture {arch}: {CONVERT_FIRST[arch]}")
    found = ", ".join(architectures) if architectures else f"none (model_type {hf_config.get('model_type')!r})"
    raise UnsupportedArchitectureError(
        f"{where}: unsupported architecture {found}; supported: {', '.join(supported_architectures())}"
    )
