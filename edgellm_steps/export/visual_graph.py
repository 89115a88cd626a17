"""The Edge-LLM vision-encoder graph (contract section 7), built node by node from a vision spec.

Inputs are what the runtime computes for a batch of images packed along one axis of
``hw`` patches (patches of one image are consecutive, in the processor's 2 x 2
merge-block order):

- ``input`` float16 [hw, C*T*P*P]: the flattened, normalized patches;
- ``rotary_pos_emb`` float32 [hw, D/2]: each patch's (row, column) angles, row angles
  first, in patch order;
- ``attention_mask`` float16 [1, hw, hw]: additive, 0 within an image and a large negative
  across images;
- Qwen2.5-VL only: ``window_attention_mask`` (the same within a window), ``window_index``
  and ``reverse_window_index`` int64 [hw/4]: the merge units in window order and back.

The output ``output`` float16 [hw/4, out] holds one embedding per image token, in the
images' original token order. As with the decoder graph, weights stream from the
checkpoint into ``onnx_model.data`` one at a time. Qwen3-VL's tower reuses these blocks
(:mod:`edgellm_steps.export.visual_graph_qwen3`).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto

from edgellm_steps.artifacts.checkpoint import TensorStore
from edgellm_steps.export.quantized_linear import emit_linear
from edgellm_steps.export.visual_io import (
    ATTENTION_MASK,
    INPUT,
    OUTPUT,
    REVERSE_WINDOW_INDEX,
    ROTARY_POS_EMB,
    WINDOW_ATTENTION_MASK,
    WINDOW_INDEX,
    visual_inputs,
    visual_outputs,
)
from edgellm_steps.graph.graph_ops import add_bias, rms_norm
from edgellm_steps.graph.onnx_builder import GraphBuilder
from edgellm_steps.graph.weight_streams import fp16_transposed_chunks
from edgellm_steps.models.families import VisionSpec
from edgellm_steps.models.vision_geometry import VisionDims

log = logging.getLogger(__name__)


def _node_path(module: str) -> str:
    return "/" + module.replace(".", "/")


class VisualGraph:
    """Builds one vision-encoder graph; ``fp8_modules`` names the Linear modules emitted in fp8."""

    #: The ungated block MLP's two Linears (Qwen2-VL's names; Qwen3-VL's differ).
    fc_names = ("fc1", "fc2")

    def __init__(
        self,
        builder: GraphBuilder,
        store: TensorStore,
        spec: VisionSpec,
        dims: VisionDims,
        prefix: str,
        *,
        fp8_modules: frozenset[str] = frozenset(),
    ) -> None:
        self.g = builder
        self.store = store
        self.spec = spec
        self.dims = dims
        self.prefix = prefix
        self.fp8_modules = fp8_modules

    def const(self, values: list[int] | np.ndarray, hint: str, dtype: Any = np.int64) -> str:
        return self.g.constant(np.asarray(values, dtype=dtype), hint)

    def linear(self, module: str, x: str) -> str:
        path = _node_path(module)
        fmt = "fp8" if module in self.fp8_modules else None
        y = emit_linear(self.g, self.store, module, path, x, self.store.get(f"{module}.weight"), fmt)
        return add_bias(self.g, self.store, module, y, path)

    def norm(self, module: str, x: str) -> str:
        """The tower's RMSNorm or LayerNorm, statistics in float32."""
        g, path = self.g, _node_path(module)
        if self.spec.norm == "rms":
            return rms_norm(g, self.store, f"{module}.weight", x, path, self.dims.norm_eps)
        xf = g.op("Cast", [x], f"{path}/Cast", to=TensorProto.FLOAT)
        weight = g.weight(f"{module}.weight", self.store.get(f"{module}.weight").float().numpy())
        bias = g.weight(f"{module}.bias", self.store.get(f"{module}.bias").float().numpy())
        eps = np.float32(self.dims.norm_eps)
        normed = g.op("LayerNormalization", [xf, weight, bias], f"{path}/LayerNormalization", axis=-1, epsilon=eps)
        return g.op("Cast", [normed], f"{path}/Cast_1", to=TensorProto.FLOAT16)

    def activation(self, x: str, path: str) -> str:
        g, act = self.g, self.dims.hidden_act
        if act == "gelu":
            return self.gelu(x, path)
        if act == "gelu_pytorch_tanh":
            return self.gelu_tanh(x, path)
        gate = x if act == "silu" else g.op("Mul", [x, self.const(1.702, "quick_gelu", np.float16)], f"{path}/Mul")
        return g.op("Mul", [x, g.op("Sigmoid", [gate], f"{path}/Sigmoid")], f"{path}/Mul_1")

    def gelu(self, x: str, path: str) -> str:
        """Exact (erf) GELU, computed in float32."""
        g = self.g
        xf = g.op("Cast", [x], f"{path}/Cast", to=TensorProto.FLOAT)
        scaled = g.op("Mul", [xf, self.const(1 / math.sqrt(2), "inv_sqrt2", np.float32)], f"{path}/Mul")
        erf = g.op("Erf", [scaled], f"{path}/Erf")
        one_plus = g.op("Add", [erf, self.const(1.0, "one_f32", np.float32)], f"{path}/Add")
        half_x = g.op("Mul", [xf, self.const(0.5, "half_f32", np.float32)], f"{path}/Mul_1")
        out = g.op("Mul", [half_x, one_plus], f"{path}/Mul_2")
        return g.op("Cast", [out], f"{path}/Cast_1", to=TensorProto.FLOAT16)

    def gelu_tanh(self, x: str, path: str) -> str:
        """GELU's tanh approximation (HF ``gelu_pytorch_tanh``), in float32: opset 19 has no Gelu node."""
        g = self.g
        xf = g.op("Cast", [x], f"{path}/Cast", to=TensorProto.FLOAT)
        cube = g.op("Mul", [g.op("Mul", [xf, xf], f"{path}/Mul"), xf], f"{path}/Mul_1")
        cubic = g.op("Mul", [cube, self.const(0.044715, "gelu_tanh_cubic", np.float32)], f"{path}/Mul_2")
        inner = g.op("Add", [xf, cubic], f"{path}/Add")
        scaled = g.op(
            "Mul", [inner, self.const(math.sqrt(2 / math.pi), "gelu_tanh_scale", np.float32)], f"{path}/Mul_3"
        )
        one_plus = g.op(
            "Add", [g.op("Tanh", [scaled], f"{path}/Tanh"), self.const(1.0, "one_f32", np.float32)], f"{path}/Add_1"
        )
        half_x = g.op("Mul", [xf, self.const(0.5, "half_f32", np.float32)], f"{path}/Mul_4")
        out = g.op("Mul", [half_x, one_plus], f"{path}/Mul_5")
        return g.op("Cast", [out], f"{path}/Cast_1", to=TensorProto.FLOAT16)

    def rope(self, x: str, cos: str, sin: str, path: str) -> str:
        """x * cos + rotate_half(x) * sin over the whole head, in float32 (as transformers applies it)."""
        g, half = self.g, self.dims.head_dim // 2
        xf = g.op("Cast", [x], f"{path}/Cast", to=TensorProto.FLOAT)
        halves = self.const([half, half], "split_halves")
        first, second = g.node("Split", [xf, halves], f"{path}/Split", outputs=2, axis=-1)
        rotated = g.op("Concat", [g.op("Neg", [second], f"{path}/Neg"), first], f"{path}/Concat", axis=-1)
        terms = [g.op("Mul", [xf, cos], f"{path}/Mul"), g.op("Mul", [rotated, sin], f"{path}/Mul_1")]
        out = g.op("Add", terms, f"{path}/Add")
        return g.op("Cast", [out], f"{path}/Cast_1", to=TensorProto.FLOAT16)

    def attention(self, module: str, x: str, cos: str, sin: str, mask: str) -> str:
        g, d = self.g, self.dims
        path = _node_path(module)
        heads = self.const([0, 3, d.num_heads, d.head_dim], "qkv")
        qkv = g.op("Reshape", [self.linear(f"{module}.qkv", x), heads], f"{path}/Reshape")
        parts = g.node("Split", [qkv, self.const([1, 1, 1], "split_qkv")], f"{path}/Split", outputs=3, axis=1)
        q, k, v = (g.op("Squeeze", [p, self.const([1], "axis_1")], f"{path}/Squeeze") for p in parts)
        q = self.rope(q, cos, sin, f"{path}/rope_q")
        k = self.rope(k, cos, sin, f"{path}/rope_k")
        q = g.op("Mul", [q, self.const(d.head_dim**-0.5, "attn_scale", np.float16)], f"{path}/Mul")
        q = g.op("Transpose", [q], f"{path}/Transpose", perm=[1, 0, 2])  # [heads, hw, D]
        k = g.op("Transpose", [k], f"{path}/Transpose_1", perm=[1, 2, 0])  # [heads, D, hw]
        v = g.op("Transpose", [v], f"{path}/Transpose_2", perm=[1, 0, 2])
        scores = g.op("Cast", [g.op("MatMul", [q, k], f"{path}/MatMul")], f"{path}/Cast", to=TensorProto.FLOAT)
        probs = g.op("Softmax", [g.op("Add", [scores, mask], f"{path}/Add")], f"{path}/Softmax", axis=-1)
        probs = g.op("Cast", [probs], f"{path}/Cast_1", to=TensorProto.FLOAT16)
        out = g.op("Transpose", [g.op("MatMul", [probs, v], f"{path}/MatMul_1")], f"{path}/Transpose_3", perm=[1, 0, 2])
        out = g.op("Reshape", [out, self.const([0, d.width], "merge_heads")], f"{path}/Reshape_1")
        return self.linear(f"{module}.proj", out)

    def mlp(self, module: str, x: str) -> str:
        path = _node_path(module)
        if self.spec.gated_mlp:
            gate = self.activation(self.linear(f"{module}.gate_proj", x), f"{path}/act_fn")
            gated = self.g.op("Mul", [gate, self.linear(f"{module}.up_proj", x)], f"{path}/Mul")
            return self.linear(f"{module}.down_proj", gated)
        fc1, fc2 = self.fc_names
        return self.linear(f"{module}.{fc2}", self.activation(self.linear(f"{module}.{fc1}", x), f"{path}/act"))

    def by_window(self, x: str, width: int, index: str, path: str) -> str:
        """Rows of ``x`` [hw, width] regrouped by merge unit in the order of ``index`` [hw/4]."""
        g, unit = self.g, self.dims.merge_unit
        units = g.op("Reshape", [x, self.const([-1, unit * width], f"units_{width}")], f"{path}/Reshape")
        gathered = g.op("Gather", [units, index], f"{path}/Gather", axis=0)
        return g.op("Reshape", [gathered, self.const([-1, width], f"rows_{width}")], f"{path}/Reshape_1")

    def declare_io(self) -> None:
        for spec in visual_inputs(self.dims, windowed=self.spec.window_attention):
            self.g.add_input(spec.name, spec.elem_type, list(spec.dims))
        for spec in visual_outputs(self.dims):
            self.g.add_output(spec.name, spec.elem_type, list(spec.dims))

    def embed_patches(self) -> str:
        """[hw, width]: the patch embedding, a Conv3d whose stride equals its kernel, as one MatMul (plus its bias)."""
        g, d = self.g, self.dims
        patch = f"{self.prefix}patch_embed.proj"
        kernel = self.store.get(f"{patch}.weight").reshape(d.width, d.patch_dim)
        w = g.weight_chunks(f"{patch}.weight", np.float16, (d.patch_dim, d.width), fp16_transposed_chunks(kernel))
        x = g.op("MatMul", [INPUT, w], f"{_node_path(patch)}/MatMul")
        return add_bias(self.g, self.store, patch, x, _node_path(patch))

    def rotary(self, angles: str) -> tuple[str, str]:
        """cos and sin [hw, 1, D] of the angles [hw, D/2], repeated over both halves of the head."""
        g = self.g
        emb = g.op("Concat", [angles, angles], "/rotary/Concat", axis=-1)
        emb = g.op("Unsqueeze", [emb, self.const([1], "axis_1")], "/rotary/Unsqueeze")  # [hw, 1, D]
        return g.op("Cos", [emb], "/rotary/Cos"), g.op("Sin", [emb], "/rotary/Sin")

    def block(self, i: int, x: str, cos: str, sin: str, mask: str) -> str:
        """Vision block ``i``: pre-norm attention and MLP, each added to the residual stream."""
        g, block = self.g, f"{self.prefix}blocks.{i}"
        h = self.attention(f"{block}.attn", self.norm(f"{block}.norm1", x), cos, sin, mask)
        x = g.op("Add", [x, h], f"{_node_path(block)}/Add")
        return g.op("Add", [x, self.mlp(f"{block}.mlp", self.norm(f"{block}.norm2", x))], f"{_node_path(block)}/Add_1")

    def build(self) -> onnx.ModelProto:
        g, d, p = self.g, self.dims, self.prefix
        self.declare_io()
        window = self.spec.window_attention
        x = self.embed_patches()
        angles = ROTARY_POS_EMB
        if window:
            x = self.by_window(x, d.width, WINDOW_INDEX, "/window/hidden")
            angles = self.by_window(angles, d.head_dim // 2, WINDOW_INDEX, "/window/rotary")
        cos, sin = self.rotary(angles)
        masks = {
            name: g.op("Cast", [name], f"/{name}/Cast", to=TensorProto.FLOAT)
            for name in ((ATTENTION_MASK, WINDOW_ATTENTION_MASK) if window else (ATTENTION_MASK,))
        }
        for i in range(d.depth):
            full = not window or i in d.fullatt_blocks
            x = self.block(i, x, cos, sin, masks[ATTENTION_MASK if full else WINDOW_ATTENTION_MASK])
        merger = f"{p}merger"
        h = self.norm(f"{merger}.ln_q", x)
        h = g.op("Reshape", [h, self.const([-1, d.merge_unit * d.width], "merge_units")], "/merger/Reshape")
        h = self.linear(f"{merger}.mlp.2", self.gelu(self.linear(f"{merger}.mlp.0", h), "/merger/mlp/gelu"))
        if window:
            g.node("Gather", [h, REVERSE_WINDOW_INDEX], "/window/reverse/Gather", outputs=[OUTPUT], axis=0)
        else:
            g.node("Identity", [h], "/output/Identity", outputs=[OUTPUT])
        return g.to_model("edgellm_visual")
