"""The Qwen3-VL vision-encoder graph (contract section 7.2): the Qwen2-VL blocks plus learned positions and deepstack.

What differs from :class:`~edgellm_steps.export.visual_graph.VisualGraph`, and why:

- a learned G x G position grid, which the runtime resamples per image: it feeds the 4 corner
  rows of each patch (``fast_pos_embed_idx`` [4, hw], already in merge-block order) and their
  bilinear weights (``fast_pos_embed_weight`` [4, hw]); the graph adds
  ``sum_c pos_embed[idx[c]] * weight[c]`` to the patch embeddings, so no resampling lives in it;
- LayerNorm blocks with an ungated ``linear_fc1`` / ``linear_fc2`` MLP (tanh GELU) and a patch
  embedding with a bias;
- no window attention: every block attends within its image (``attention_mask``);
- deepstack: ``deepstack_merger_list[k]`` taps the hidden states after block
  ``deepstack_visual_indexes[k]`` and gives output ``deepstack_features_k``, which the language
  model adds after its decoder layer k. The final merger normalizes over the vision width
  *before* the 2 x 2 shuffle; the deepstack mergers shuffle first and normalize over 4x the
  width. Both then run fc1 -> exact (erf) GELU (``nn.GELU()``) -> fc2.
"""

from __future__ import annotations

import onnx
from onnx import TensorProto

from edgellm_steps.export.visual_graph import VisualGraph
from edgellm_steps.export.visual_io import (
    ATTENTION_MASK,
    FAST_POS_EMBED_IDX,
    FAST_POS_EMBED_WEIGHT,
    OUTPUT,
    ROTARY_POS_EMB,
    deepstack_names,
)
from edgellm_steps.graph.graph_ops import fp16


class Qwen3VisualGraph(VisualGraph):
    """Builds the Qwen3-VL vision-encoder graph from the checkpoint's ``model.visual.*`` tensors."""

    fc_names = ("linear_fc1", "linear_fc2")

    def position_embedding(self) -> str:
        """[hw, width]: the learned grid's 4 corner rows of each patch, mixed by the runtime's bilinear weights."""
        g = self.g
        name = f"{self.prefix}pos_embed.weight"
        table = g.weight(name, fp16(self.store.get(name)))  # [G*G, width]
        corners = g.op("Gather", [table, FAST_POS_EMBED_IDX], "/pos_embed/Gather", axis=0)  # [4, hw, width]
        weights = g.op("Unsqueeze", [FAST_POS_EMBED_WEIGHT, self.const([2], "axis_2")], "/pos_embed/Unsqueeze")
        mixed = g.op("Mul", [corners, weights], "/pos_embed/Mul")
        return g.op("ReduceSum", [mixed, self.const([0], "axis_0")], "/pos_embed/ReduceSum", keepdims=0)

    def merger(self, module: str, x: str, *, shuffle_first: bool) -> str:
        """A patch merger: 2 x 2 patches -> one image token of the decoder's width.

        ``shuffle_first`` (the deepstack mergers): the LayerNorm runs over the joined 4 x width
        row; otherwise (the final merger) over each patch before joining.
        """
        g, d = self.g, self.dims
        path = "/" + module.replace(".", "/")
        joined = self.const([-1, d.merge_unit * d.width], "merge_units")
        if shuffle_first:
            h = self.norm(f"{module}.norm", g.op("Reshape", [x, joined], f"{path}/Reshape"))
        else:
            h = g.op("Reshape", [self.norm(f"{module}.norm", x), joined], f"{path}/Reshape")
        h = self.gelu(self.linear(f"{module}.linear_fc1", h), f"{path}/gelu")
        return self.linear(f"{module}.linear_fc2", h)

    def build(self) -> onnx.ModelProto:
        g, d, p = self.g, self.dims, self.prefix
        self.declare_io()
        x = g.op("Add", [self.embed_patches(), self.position_embedding()], "/pos_embed/Add")
        cos, sin = self.rotary(ROTARY_POS_EMB)
        mask = g.op("Cast", [ATTENTION_MASK], f"/{ATTENTION_MASK}/Cast", to=TensorProto.FLOAT)
        taps = dict(zip(d.deepstack_indexes, deepstack_names(d), strict=True))
        for i in range(d.depth):
            x = self.block(i, x, cos, sin, mask)
            if i in taps:
                k = d.deepstack_indexes.index(i)
                feature = self.merger(f"{p}deepstack_merger_list.{k}", x, shuffle_first=True)
                g.node("Identity", [feature], f"/{taps[i]}/Identity", outputs=[taps[i]])
        h = self.merger(f"{p}merger", x, shuffle_first=False)
        g.node("Identity", [h], "/output/Identity", outputs=[OUTPUT])
        return g.to_model("edgellm_visual")
