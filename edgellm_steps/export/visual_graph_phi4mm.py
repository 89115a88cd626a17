"""The Phi-4-multimodal vision-encoder graph (contract 7.4): crops in, 256 projected rows per crop out.

Input ``input`` float16 [num_blocks, 3, 448, 448] (the runtime's HD crops and global image, normalized);
output ``output`` float16 [num_blocks * 256, hidden]: per crop, SigLIP's ``hidden_states[feature_layer]``
(patch embedding, learned positions, pre-norm blocks with tanh-GELU MLPs; no CLS token and no final
LayerNorm), averaged over 2 x 2 neighbouring patches, then the image projection
(``img_projection_up`` -> exact GELU -> ``img_projection_down``). The projection is per row, so the
separators the runtime lays between rows (``sub_GN``) and before the global image (``glb_GN``) are projected
once, here, into the side file ``phi4mm_gn_proj.safetensors`` (float16 [hidden] each) rather than per image.
"""

from __future__ import annotations

from pathlib import Path

import torch
from onnx import TensorProto

from edgellm_steps.export.visual_graph import _node_path
from edgellm_steps.export.visual_graph_internvl import InternVLVisualGraph
from edgellm_steps.graph.graph_ops import fp16

#: The side file of the separators, projected, and its tensors (the runtime's names).
GN_PROJ_FILE = "phi4mm_gn_proj.safetensors"
#: (side-file tensor, the checkpoint's separator parameter under the projector prefix).
SEPARATORS = (("glb_GN", "global_img_feature_extensor"), ("sub_GN", "sub_img_feature_extensor"))


class Phi4mmVisualGraph(InternVLVisualGraph):
    """Builds the Phi-4-multimodal vision-encoder graph from ``model.embed_tokens_extend.image_embed.*``."""

    @property
    def rows(self) -> int:
        """Rows per crop inside the tower: its patches (SigLIP has no CLS token)."""
        return self.dims.grid**2

    def embed_tiles(self) -> str:
        """[blocks * G^2, C]: each crop's patch embeddings plus the learned positions (the grid's own, in order)."""
        g, d, p = self.g, self.dims, self.prefix
        x = self.patch_embeddings(f"{p}embeddings.patch_embedding")
        positions = f"{p}embeddings.position_embedding.weight"
        x = g.op("Add", [x, g.weight(positions, fp16(self.store.get(positions)))], "/embeddings/Add")
        return g.op("Reshape", [x, self.const([-1, d.width], "rows")], "/embeddings/Reshape")

    def layer(self, i: int, x: str) -> str:
        """A SigLIP encoder layer: pre-norm attention and MLP, each added to the residual stream."""
        g, layer = self.g, f"{self.prefix}encoder.layers.{i}"
        path = _node_path(layer)
        h = self.tile_attention(f"{layer}.self_attn", self.norm(f"{layer}.layer_norm1", x), out="out_proj")
        x = g.op("Add", [x, h], f"{path}/Add")
        h = self.norm(f"{layer}.layer_norm2", x)
        h = self.linear(f"{layer}.mlp.fc2", self.activation(self.linear(f"{layer}.mlp.fc1", h), f"{path}/mlp/act"))
        return g.op("Add", [x, h], f"{path}/Add_1")

    def merge_patches(self, x: str) -> str:
        """[blocks * G^2, C] -> [blocks * 256, C]: the mean of each 2 x 2 group of neighbouring patches, in float32."""
        g, d = self.g, self.dims
        half = d.grid // d.shuffle
        groups = [-1, half, d.shuffle, half, d.shuffle, d.width]
        x = g.op(
            "Cast",
            [g.op("Reshape", [x, self.const(groups, "pool_groups")], "/pool/Reshape")],
            "/pool/Cast",
            to=TensorProto.FLOAT,
        )
        mean = g.op("ReduceMean", [x, self.const([2, 4], "pool_axes")], "/pool/ReduceMean", keepdims=0)
        mean = g.op("Cast", [mean], "/pool/Cast_1", to=TensorProto.FLOAT16)
        return g.op("Reshape", [mean, self.const([-1, d.width], "rows")], "/pool/Reshape_1")

    def project(self, h: str) -> str:
        """The image projection: up, exact GELU, down (per row)."""
        up = self.linear(f"{self.projector}img_projection_up", h)
        return self.linear(f"{self.projector}img_projection_down", self.gelu(up, "/projection/gelu"))

    def write_sidecars(self, directory: Path) -> None:
        """``phi4mm_gn_proj.safetensors``: each separator through the image projection, in float32, saved float16."""
        from safetensors.numpy import save_file

        def linear(name: str, x: torch.Tensor) -> torch.Tensor:
            module = f"{self.projector}{name}"
            return x @ self.store.get(f"{module}.weight").float().T + self.store.get(f"{module}.bias").float()

        projected = {}
        for key, parameter in SEPARATORS:
            vector = self.store.get(f"{self.projector}{parameter}").float().reshape(-1)
            up = torch.nn.functional.gelu(linear("img_projection_up", vector))
            projected[key] = linear("img_projection_down", up).to(torch.float16).numpy()
        save_file(projected, str(directory / GN_PROJ_FILE))
