"""The Edge-LLM decoder graph (contract section 3), built node by node from a family spec.

The graph is written directly rather than traced: every weight is read from the
checkpoint by byte range (:class:`~edgellm_steps.artifacts.checkpoint.TensorStore`), converted,
streamed to ``onnx_model.data`` and released, so the export never holds the model
twice (nor once). RoPE and the KV-cache update live inside ``trt::AttentionPlugin``.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import numpy as np
import onnx
import torch
from onnx import TensorProto

from edgellm_steps.artifacts.checkpoint import DecoderDims, TensorStore
from edgellm_steps.errors import SourceError
from edgellm_steps.export import llm_io
from edgellm_steps.export.lora_sites import LoraSite, record_sites
from edgellm_steps.export.quantized_linear import HELD_EMITTERS, emit_linear
from edgellm_steps.graph.graph_ops import add_bias, rms_norm
from edgellm_steps.graph.onnx_builder import GraphBuilder
from edgellm_steps.models.eagle import eagle_hidden_state_indices
from edgellm_steps.models.families import FamilySpec
from edgellm_steps.plugins.attention import emit_attention_plugin
from edgellm_steps.quant.formats import FORMATS
from edgellm_steps.quant.quant_plan import QuantPlan

log = logging.getLogger(__name__)


def _node_path(module: str) -> str:
    """``model.layers.0.self_attn`` -> ``/model/layers.0/self_attn`` (torch exporter style)."""
    parts = module.split(".")
    merged: list[str] = []
    for part in parts:
        if part.isdigit() and merged:
            merged[-1] = f"{merged[-1]}.{part}"
        else:
            merged.append(part)
    return "/" + "/".join(merged)


class DecoderGraph:
    """Builds one decoder graph; one method per block of the architecture."""

    def __init__(
        self,
        builder: GraphBuilder,
        store: TensorStore,
        spec: FamilySpec,
        dims: DecoderDims,
        quant: QuantPlan,
        *,
        eagle_base: bool = False,
        vocab_map: np.ndarray | None = None,
    ) -> None:
        self.g = builder
        self.store = store
        self.spec = spec
        self.dims = dims
        self.quant = quant
        #: An EAGLE3 base (contract 5): tree attention, several selected tokens, the hidden_states output.
        self.eagle_base = eagle_base
        #: Reduced vocabulary: the lm_head keeps these rows (ascending base ids), the logits these columns.
        self.vocab_map = vocab_map
        #: The GEMMs LoRA may adapt, and the sites the graph records for insert-lora as it emits them.
        self.lora_shapes = spec.linear_shapes(dims)
        self.lora_sites: list[LoraSite] = []

    @property
    def tree_attention(self) -> bool:
        """Whether the attention plugins take the speculation tree (every EAGLE graph)."""
        return self.eagle_base

    def linear(self, module: str, x: str, *, weight: torch.Tensor | None = None) -> str:
        """The GEMM of one Linear in its format (quantized_linear), plus the bias when the checkpoint has one."""
        path = _node_path(module)
        fmt = self.quant.linear_format(module, self.store)
        if fmt is not None and not FORMATS[fmt].made_here:
            y = HELD_EMITTERS[FORMATS[fmt].onnx_emitter](self.g, self.store, module, path, x, self.quant.gptq)
        else:
            w = weight if weight is not None else self.store.get(f"{module}.weight")
            y = emit_linear(self.g, self.store, module, path, x, w, fmt)
            del w
        y = add_bias(self.g, self.store, module, y, path)
        if module in self.lora_shapes:  # x is the activation before any quantization, y the Linear's output
            self.lora_sites.append(LoraSite(module, x, y, *self.lora_shapes[module]))
        return y

    def rms_norm(self, weight_name: str, x: str, path: str) -> str:
        return rms_norm(self.g, self.store, weight_name, x, path, self.dims.rms_norm_eps)

    def head_norm(self, weight_name: str, x: str, heads: int, path: str) -> str:
        """Per-head RMSNorm of a [B, S, heads*D] projection (Qwen3's q_norm / k_norm)."""
        d = self.dims.head_dim
        split = self.g.op(
            "Reshape",
            [x, self.g.constant(np.array([0, 0, heads, d], dtype=np.int64), "shape_heads")],
            f"{path}/Reshape",
        )
        normed = self.rms_norm(weight_name, split, path)
        merged = np.array([0, 0, heads * d], dtype=np.int64)
        return self.g.op("Reshape", [normed, self.g.constant(merged, "shape_merge")], f"{path}/Reshape_1")

    def attention(self, layer: int, prefix: str, x: str) -> str:
        d = self.dims
        attn = f"{prefix}.self_attn"
        path = _node_path(attn)
        if self.spec.fused_qkv:
            qkv = self.linear(f"{attn}.qkv_proj", x)
        else:
            q = self.linear(f"{attn}.q_proj", x)
            k = self.linear(f"{attn}.k_proj", x)
            v = self.linear(f"{attn}.v_proj", x)
            if self.spec.qk_norm:
                q = self.head_norm(f"{attn}.q_norm.weight", q, d.num_heads, _node_path(f"{attn}.q_norm"))
                k = self.head_norm(f"{attn}.k_norm.weight", k, d.num_kv_heads, _node_path(f"{attn}.k_norm"))
            qkv = self.g.op("Concat", [q, k, v], f"{path}/Concat", axis=-1)
        out = emit_attention_plugin(
            self.g,
            f"{path}/AttentionPlugin",
            qkv=qkv,
            past_key_value=llm_io.past_name(layer),
            context_lengths=llm_io.CONTEXT_LENGTHS,
            rope_rotary_cos_sin=llm_io.ROPE_COS_SIN,
            kvcache_start_index=llm_io.KVCACHE_START_INDEX,
            present_key_value=llm_io.present_name(layer),
            num_q_heads=d.num_heads,
            num_kv_heads=d.num_kv_heads,
            head_size=d.head_dim,
            kv_scales=self.quant.kv_scales(attn, self.store),
            tree=(llm_io.ATTENTION_MASK, llm_io.ATTENTION_POS_ID) if self.tree_attention else None,
        )
        shape = self.g.constant(np.array([0, 0, d.num_heads * d.head_dim], dtype=np.int64), "shape_attn_out")
        flat = self.g.op("Reshape", [out, shape], f"{path}/Reshape")
        return self.linear(f"{attn}.o_proj", flat)

    def mlp(self, prefix: str, x: str) -> str:
        mlp = f"{prefix}.mlp"
        path = _node_path(mlp)
        if self.spec.fused_gate_up:
            sizes = self.g.constant(np.array([self.dims.intermediate_size] * 2, dtype=np.int64), "split_gate_up")
            gate_up = self.linear(f"{mlp}.gate_up_proj", x)
            gate, up = self.g.node("Split", [gate_up, sizes], f"{path}/Split", outputs=2, axis=-1)
        else:
            gate = self.linear(f"{mlp}.gate_proj", x)
            up = self.linear(f"{mlp}.up_proj", x)
        silu = self.g.op("Mul", [gate, self.g.op("Sigmoid", [gate], f"{path}/act_fn/Sigmoid")], f"{path}/act_fn/Mul")
        return self.linear(f"{mlp}.down_proj", self.g.op("Mul", [silu, up], f"{path}/Mul"))

    def decoder_layer(self, layer: int, x: str) -> str:
        prefix = self.spec.layer_prefix.format(i=layer)
        if layer + 1 < self.dims.num_layers:  # the next layer's weights are read while this one is converted
            self.store.read_ahead(self.spec.layer_prefix.format(i=layer + 1) + ".")
        path = _node_path(prefix)
        h = self.rms_norm(f"{prefix}.input_layernorm.weight", x, f"{path}/input_layernorm")
        x = self.g.op("Add", [x, self.attention(layer, prefix, h)], f"{path}/Add")
        h = self.rms_norm(f"{prefix}.post_attention_layernorm.weight", x, f"{path}/post_attention_layernorm")
        return self.g.op("Add", [x, self.mlp(prefix, h)], f"{path}/Add_1")

    def lm_head_weight(self) -> torch.Tensor | None:
        """The lm_head's weight when it is not simply the checkpoint's own (tied, or rows of a reduced vocabulary)."""
        if self.vocab_map is not None:
            tied = self.spec.lm_head not in self.store and self.dims.tie_word_embeddings
            full = self.store.get(self.spec.embed_tokens if tied else self.spec.lm_head)
            return full[torch.from_numpy(self.vocab_map.astype(np.int64))]
        if self.spec.lm_head in self.store:
            return None
        if self.dims.tie_word_embeddings:
            return self.store.get(self.spec.embed_tokens)
        raise SourceError(
            f"checkpoint has no {self.spec.lm_head!r} and tie_word_embeddings is false; is the checkpoint complete?"
        )

    def build(self) -> onnx.ModelProto:
        d, g = self.dims, self.g
        kv_type = self.quant.kv_elem_type
        for spec in llm_io.llm_inputs(d, kv_type, eagle_base=self.eagle_base):
            g.add_input(spec.name, spec.elem_type, list(spec.dims))
        x = llm_io.INPUTS_EMBEDS
        states = [x]  # HF's output_hidden_states: the embeddings, then each layer's output
        for layer in range(d.num_layers):
            log.info("layer %d/%d", layer + 1, d.num_layers)
            x = self.decoder_layer(layer, x)
            if layer < d.deepstack_layers:  # Qwen3-VL: the vision tower's deepstack features join here
                x = g.op("Add", [x, llm_io.deepstack_name(layer)], f"/model/layers.{layer}/deepstack/Add")
            states.append(x)
        h = self.rms_norm(self.spec.final_norm, x, "/model/norm")
        states[-1] = h  # HF's last hidden state is the final norm's output
        if self.eagle_base:
            picked = [states[i] for i in eagle_hidden_state_indices(d.num_layers)]
            g.node("Concat", picked, "/eagle/Concat", outputs=[llm_io.HIDDEN_STATES], axis=-1)
        axes = g.constant(np.array([-1], dtype=np.int64), "axes_last")
        indices = g.op("Unsqueeze", [llm_io.LAST_TOKEN_IDS, axes], "/model/Unsqueeze_last_token_ids")
        selected = g.op("GatherND", [h, indices], "/model/GatherND", batch_dims=1)
        lm_head_module = self.spec.lm_head.removesuffix(".weight")
        logits16 = self.linear(lm_head_module, selected, weight=self.lm_head_weight())
        g.node("Cast", [logits16], "/lm_head/Cast", outputs=[llm_io.LOGITS], to=TensorProto.FLOAT)
        out_dims = d if self.vocab_map is None else replace(d, vocab_size=len(self.vocab_map))
        for spec in llm_io.llm_outputs(out_dims, kv_type, eagle_base=self.eagle_base):
            g.add_output(spec.name, spec.elem_type, list(spec.dims))
        model = g.to_model("edgellm_llm", opset=self.quant.opset)
        record_sites(model, self.lora_sites)
        return model
