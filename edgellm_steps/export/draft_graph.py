"""The EAGLE3 draft graph (contract section 5), built from the decoder graph's blocks.

One decoder layer (``midlayer``) whose attention reads ``concat(input_layernorm(embeds),
hidden_norm(h))`` (2H wide), with h = fc(base hidden states) + the draft's previous hidden
state; its residual stream starts from h. The selected rows (``last_token_ids``) give the
``hidden_states`` output (before the final norm) and, through ``norm`` and ``lm_head``, the
log-softmax logits over the draft vocabulary. Attention is tree attention, as in the base.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto

from edgellm_steps.export import llm_io
from edgellm_steps.export.llm_graph import DecoderGraph


class DraftGraph(DecoderGraph):
    """Builds one EAGLE3 draft graph; ``target_hidden_size`` and ``draft_vocab_size`` come from its config."""

    def __init__(self, *args, target_hidden_size: int, draft_vocab_size: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.target_hidden_size = target_hidden_size
        self.draft_vocab_size = draft_vocab_size

    @property
    def tree_attention(self) -> bool:
        return True

    def build(self) -> onnx.ModelProto:
        d, g = self.dims, self.g
        kv_type = self.quant.kv_elem_type
        for spec in llm_io.draft_inputs(d, self.target_hidden_size, kv_type):
            g.add_input(spec.name, spec.elem_type, list(spec.dims))
        layer = self.spec.layer_prefix
        h = self.linear("fc", llm_io.HIDDEN_STATES_INPUT)
        h = g.op("Add", [h, llm_io.HIDDEN_STATES_FROM_DRAFT], "/fc/Add")
        embeds = self.rms_norm(f"{layer}.input_layernorm.weight", llm_io.INPUTS_EMBEDS, f"/{layer}/input_layernorm")
        hidden = self.rms_norm(f"{layer}.hidden_norm.weight", h, f"/{layer}/hidden_norm")
        both = g.op("Concat", [embeds, hidden], f"/{layer}/Concat", axis=-1)
        x = g.op("Add", [h, self.attention(0, layer, both)], f"/{layer}/Add")
        post = self.rms_norm(f"{layer}.post_attention_layernorm.weight", x, f"/{layer}/post_attention_layernorm")
        x = g.op("Add", [x, self.mlp(layer, post)], f"/{layer}/Add_1")
        axes = g.constant(np.array([-1], dtype=np.int64), "axes_last")
        indices = g.op("Unsqueeze", [llm_io.LAST_TOKEN_IDS, axes], "/Unsqueeze_last_token_ids")
        g.node("GatherND", [x, indices], "/GatherND", outputs=[llm_io.HIDDEN_STATES], batch_dims=1)
        normed = self.rms_norm(self.spec.final_norm, llm_io.HIDDEN_STATES, "/norm")
        logits = g.op("Cast", [self.linear("lm_head", normed)], "/lm_head/Cast", to=TensorProto.FLOAT)
        g.node("LogSoftmax", [logits], "/LogSoftmax", outputs=[llm_io.LOGITS], axis=-1)
        for spec in llm_io.draft_outputs(d, self.draft_vocab_size, kv_type):
            g.add_output(spec.name, spec.elem_type, list(spec.dims))
        return g.to_model("edgellm_eagle3_draft", opset=self.quant.opset)
