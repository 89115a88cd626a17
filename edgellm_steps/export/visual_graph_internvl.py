"""The InternVL vision-encoder graph (contract 7.3): tiles in, 256 image-token rows per tile out.

Input ``input`` float16 [num_blocks, 3, S, S]: the runtime's normalized tiles (an image's tiles
then its thumbnail, images one after another). Output ``output`` float16 [num_blocks * 256, H]:
each tile's rows in raster order of its 2 x 2 patch groups, tiles in input order, so row k is
what the runtime splices at image token ``vocab_size + k``.

What it computes, per tile, as transformers' ``InternVLModel.get_image_features`` does:

- the patch embedding (a Conv2d whose stride is its kernel, as one MatMul over flattened patches),
  the CLS token in front, the learned position embeddings added (one per row: at the native tile
  size transformers does not interpolate them);
- ``feature_blocks`` InternViT layers: norm (LayerNorm or RMSNorm, per checkpoint) -> q, k, v
  (optionally RMS-normed over the whole width) -> full attention within the tile -> projection,
  scaled by ``lambda_1`` and added; norm -> fc1 -> GELU -> fc2, scaled by ``lambda_2`` and added;
- the tower's final LayerNorm when the config applies it; the CLS row dropped;
- the pixel shuffle (``downsample_ratio`` 0.5): patch (2r + i, 2c + j) goes to token (r, c) at
  feature offset (2i + j) * width, i.e. [G/2, 2, G/2, 2, C] -> [G/2, G/2, 2, 2, C];
- the projector: LayerNorm over the 4 x width row -> linear_1 -> GELU -> linear_2.

Rows are kept as [num_blocks * T, C] (T = G^2 + 1, fixed) between attentions, so every Linear is a
plain 2-D GEMM, as in the other vision graphs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto

from edgellm_steps.export.visual_graph import VisualGraph, _node_path
from edgellm_steps.export.visual_io import INPUT, OUTPUT, tile_inputs, tile_outputs
from edgellm_steps.graph.graph_ops import add_bias, fp16, rms_norm
from edgellm_steps.graph.weight_streams import fp16_transposed_chunks
from edgellm_steps.models.tile_geometry import PROJECTOR_EPS, TileDims

#: InternViT's q/k RMSNorm epsilon (its module default; the config has no key for it).
QK_NORM_EPS = 1e-6


class InternVLVisualGraph(VisualGraph):
    """Builds the InternVL vision-encoder graph from ``vision_tower.*`` and ``multi_modal_projector.*``."""

    dims: TileDims

    def __init__(self, *args, projector: str, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.projector = projector

    @property
    def rows(self) -> int:
        """Rows per tile inside the tower: the CLS token and every patch."""
        return self.dims.grid**2 + 1

    def tile_norm(self, module: str, x: str, *, kind: str, eps: float) -> str:
        """LayerNorm (with bias) or RMSNorm over the last axis, statistics in float32."""
        g, path = self.g, _node_path(module)
        if kind == "rms":
            return rms_norm(g, self.store, f"{module}.weight", x, path, eps)
        xf = g.op("Cast", [x], f"{path}/Cast", to=TensorProto.FLOAT)
        weight = g.weight(f"{module}.weight", self.store.get(f"{module}.weight").float().numpy())
        bias = g.weight(f"{module}.bias", self.store.get(f"{module}.bias").float().numpy())
        normed = g.op(
            "LayerNormalization", [xf, weight, bias], f"{path}/LayerNormalization", axis=-1, epsilon=np.float32(eps)
        )
        return g.op("Cast", [normed], f"{path}/Cast_1", to=TensorProto.FLOAT16)

    def norm(self, module: str, x: str) -> str:
        return self.tile_norm(module, x, kind=self.dims.norm, eps=self.dims.norm_eps)

    def patch_embeddings(self, patch: str) -> str:
        """[blocks, G^2, C]: each tile's patches through the Conv2d ``patch`` (stride = kernel) as one MatMul."""
        g, d = self.g, self.dims
        path = _node_path(patch)
        c, side = d.in_channels, d.patch_size
        grid = [-1, c, d.grid, side, d.grid, side]
        tiles = g.op("Reshape", [INPUT, self.const(grid, "tile_patches")], f"{path}/Reshape")
        tiles = g.op("Transpose", [tiles], f"{path}/Transpose", perm=[0, 2, 4, 1, 3, 5])
        flat = g.op("Reshape", [tiles, self.const([-1, c * side * side], "patch_rows")], f"{path}/Reshape_1")
        kernel = self.store.get(f"{patch}.weight").reshape(d.width, c * side * side)
        w = g.weight_chunks(f"{patch}.weight", np.float16, (c * side * side, d.width), fp16_transposed_chunks(kernel))
        x = add_bias(g, self.store, patch, g.op("MatMul", [flat, w], f"{path}/MatMul"), path)
        return g.op("Reshape", [x, self.const([-1, d.grid**2, d.width], "tile_patch_rows")], f"{path}/Reshape_2")

    def embed_tiles(self) -> str:
        """[blocks * T, C]: CLS then the patches of each tile, positions added."""
        g, d, p = self.g, self.dims, self.prefix
        x = self.patch_embeddings(f"{p}embeddings.patch_embeddings.projection")
        # The CLS token, one per tile: broadcast [1, 1, C] to [blocks, 1, C].
        blocks = g.op("Slice", [g.op("Shape", [x], "/cls/Shape"), *self.slice_args(0, 1)], "/cls/Slice")
        cls_shape = g.op("Concat", [blocks, self.const([1, d.width], "cls_tail")], "/cls/Concat", axis=0)
        cls = g.weight(f"{p}embeddings.cls_token", fp16(self.store.get(f"{p}embeddings.cls_token")))
        x = g.op("Concat", [g.op("Expand", [cls, cls_shape], "/cls/Expand"), x], "/embeddings/Concat", axis=1)
        positions = f"{p}embeddings.position_embeddings"
        x = g.op("Add", [x, g.weight(positions, fp16(self.store.get(positions)))], "/embeddings/Add")
        return g.op("Reshape", [x, self.const([-1, d.width], "rows")], "/embeddings/Reshape")

    def slice_args(self, start: int, end: int, axis: int = 0) -> list[str]:
        return [
            self.const([start], f"start_{start}"),
            self.const([end], f"end_{end}"),
            self.const([axis], f"ax_{axis}"),
        ]

    def tile_attention(self, module: str, x: str, *, out: str = "projection_layer") -> str:
        """Full attention within each tile: [blocks * T, C] -> [blocks * T, C]."""
        g, d = self.g, self.dims
        path = _node_path(module)
        q, k, v = (self.linear(f"{module}.{name}_proj", x) for name in ("q", "k", "v"))
        if d.qk_norm:
            q = rms_norm(g, self.store, f"{module}.q_norm.weight", q, f"{path}/q_norm", QK_NORM_EPS)
            k = rms_norm(g, self.store, f"{module}.k_norm.weight", k, f"{path}/k_norm", QK_NORM_EPS)
        heads = self.const([-1, self.rows, d.num_heads, d.head_dim], "tile_heads")
        q, k, v = (g.op("Reshape", [t, heads], f"{path}/Reshape") for t in (q, k, v))
        q = g.op("Mul", [q, self.const(d.head_dim**-0.5, "attn_scale", np.float16)], f"{path}/Mul")
        q = g.op("Transpose", [q], f"{path}/Transpose", perm=[0, 2, 1, 3])  # [blocks, heads, T, D]
        k = g.op("Transpose", [k], f"{path}/Transpose_1", perm=[0, 2, 3, 1])  # [blocks, heads, D, T]
        v = g.op("Transpose", [v], f"{path}/Transpose_2", perm=[0, 2, 1, 3])
        scores = g.op("Cast", [g.op("MatMul", [q, k], f"{path}/MatMul")], f"{path}/Cast", to=TensorProto.FLOAT)
        probs = g.op("Softmax", [scores], f"{path}/Softmax", axis=-1)
        probs = g.op("Cast", [probs], f"{path}/Cast_1", to=TensorProto.FLOAT16)
        heads_out = g.op("MatMul", [probs, v], f"{path}/MatMul_1")
        merged = g.op("Transpose", [heads_out], f"{path}/Transpose_3", perm=[0, 2, 1, 3])
        merged = g.op("Reshape", [merged, self.const([-1, d.width], "rows")], f"{path}/Reshape_1")
        return self.linear(f"{module}.{out}", merged)

    def scaled(self, name: str, x: str, path: str) -> str:
        """``x`` times the layer-scale vector ``name``."""
        return self.g.op("Mul", [x, self.g.weight(name, fp16(self.store.get(name)))], path)

    def layer(self, i: int, x: str) -> str:
        g, layer = self.g, f"{self.prefix}encoder.layer.{i}"
        path = _node_path(layer)
        h = self.tile_attention(f"{layer}.attention", self.norm(f"{layer}.layernorm_before", x))
        x = g.op("Add", [x, self.scaled(f"{layer}.lambda_1", h, f"{path}/Mul")], f"{path}/Add")
        h = self.norm(f"{layer}.layernorm_after", x)
        h = self.linear(f"{layer}.mlp.fc2", self.activation(self.linear(f"{layer}.mlp.fc1", h), f"{path}/mlp/act"))
        return g.op("Add", [x, self.scaled(f"{layer}.lambda_2", h, f"{path}/Mul_1")], f"{path}/Add_1")

    def pixel_shuffle(self, x: str) -> str:
        """[blocks * T, C] with the CLS rows -> [blocks * 256, 4C]: CLS dropped, 2 x 2 patch groups joined."""
        g, d = self.g, self.dims
        half = d.grid // d.shuffle
        x = g.op("Reshape", [x, self.const([-1, self.rows, d.width], "tile_rows")], "/shuffle/Reshape")
        x = g.op("Slice", [x, *self.slice_args(1, self.rows, axis=1)], "/shuffle/Slice")
        groups = [-1, half, d.shuffle, half, d.shuffle, d.width]
        x = g.op("Reshape", [x, self.const(groups, "shuffle_groups")], "/shuffle/Reshape_1")
        x = g.op("Transpose", [x], "/shuffle/Transpose", perm=[0, 1, 3, 2, 4, 5])
        return g.op("Reshape", [x, self.const([-1, d.shuffled_width], "shuffled_rows")], "/shuffle/Reshape_2")

    def declare_io(self) -> None:
        for spec in tile_inputs(self.dims):
            self.g.add_input(spec.name, spec.elem_type, list(spec.dims))
        for spec in tile_outputs(self.dims):
            self.g.add_output(spec.name, spec.elem_type, list(spec.dims))

    def build(self) -> onnx.ModelProto:
        g, d, p = self.g, self.dims, self.prefix
        self.declare_io()
        x = self.embed_tiles()
        for i in range(d.feature_blocks):
            x = self.layer(i, x)
        if d.final_norm:
            x = self.tile_norm(f"{p}layernorm", x, kind="layer", eps=d.norm_eps)
        g.node("Identity", [self.project(self.merge_patches(x))], "/output/Identity", outputs=[OUTPUT])
        return g.to_model("edgellm_visual")

    def merge_patches(self, x: str) -> str:
        """[blocks * T, C] -> one row per image token: InternVL's pixel shuffle."""
        return self.pixel_shuffle(x)

    def project(self, h: str) -> str:
        """InternVL's projector: LayerNorm over the joined row, linear_1, GELU, linear_2."""
        h = self.tile_norm(f"{self.projector}layer_norm", h, kind="layer", eps=PROJECTOR_EPS)
        h = self.gelu(self.linear(f"{self.projector}linear_1", h), "/projector/gelu")
        return self.linear(f"{self.projector}linear_2", h)

    def write_sidecars(self, directory: Path) -> None:
        """Files the runtime reads beside the vision engine, other than the graph (none for InternVL)."""
