"""The vision encoder graph's inputs and outputs (contract section 7), named once.

The graph builder, the CPU reference's feeds and the engine's optimization profiles all read these.
"""

from __future__ import annotations

from onnx import TensorProto

from edgellm_steps.export.llm_io import TensorSpec
from edgellm_steps.models.tile_geometry import TileDims
from edgellm_steps.models.vision_geometry import VisionDims

# Graph I/O names and symbolic dims (contract section 7).
INPUT = "input"
ROTARY_POS_EMB = "rotary_pos_emb"
ATTENTION_MASK = "attention_mask"
WINDOW_ATTENTION_MASK = "window_attention_mask"
WINDOW_INDEX = "window_index"
REVERSE_WINDOW_INDEX = "reverse_window_index"
#: Qwen3-VL (contract 7.2): the 4 corner rows of the learned position grid per patch, and their bilinear weights.
FAST_POS_EMBED_IDX = "fast_pos_embed_idx"
FAST_POS_EMBED_WEIGHT = "fast_pos_embed_weight"
#: Corners each patch mixes (bilinear: floor/ceil on each axis).
POSITION_TAPS = 4
OUTPUT = "output"
#: Qwen3-VL: one output per deepstack merger, ``deepstack_features_0`` onwards.
DEEPSTACK_FEATURES = "deepstack_features_{k}"
HW = "hw"
IMAGE_TOKENS = "image_token_len"
#: A tiled tower (InternVL, contract 7.3): tiles in, 256 rows per tile out.
NUM_BLOCKS = "num_blocks"


def visual_inputs(dims: VisionDims, *, windowed: bool) -> list[TensorSpec]:
    """Inputs of the vision encoder graph in contract order: patches, rotary angles, masks, window order.

    A tower with a learned position grid (Qwen3-VL) takes the grid's corner indices and weights last.
    """
    inputs = [
        TensorSpec(INPUT, TensorProto.FLOAT16, (HW, dims.patch_dim)),
        TensorSpec(ROTARY_POS_EMB, TensorProto.FLOAT, (HW, dims.head_dim // 2)),
        TensorSpec(ATTENTION_MASK, TensorProto.FLOAT16, (1, HW, HW)),
    ]
    if windowed:
        inputs += [
            TensorSpec(WINDOW_ATTENTION_MASK, TensorProto.FLOAT16, (1, HW, HW)),
            TensorSpec(WINDOW_INDEX, TensorProto.INT64, (IMAGE_TOKENS,)),
            TensorSpec(REVERSE_WINDOW_INDEX, TensorProto.INT64, (IMAGE_TOKENS,)),
        ]
    if dims.position_grid:
        inputs += [
            TensorSpec(FAST_POS_EMBED_IDX, TensorProto.INT64, (POSITION_TAPS, HW)),
            TensorSpec(FAST_POS_EMBED_WEIGHT, TensorProto.FLOAT16, (POSITION_TAPS, HW)),
        ]
    return inputs


def deepstack_names(dims: VisionDims) -> list[str]:
    """The deepstack outputs' names, in merger order (none for Qwen2-VL / Qwen2.5-VL)."""
    return [DEEPSTACK_FEATURES.format(k=k) for k in range(len(dims.deepstack_indexes))]


def visual_outputs(dims: VisionDims) -> list[TensorSpec]:
    """An embedding per image token, then (Qwen3-VL) each deepstack merger's, all the same shape."""
    names = [OUTPUT, *deepstack_names(dims)]
    return [TensorSpec(name, TensorProto.FLOAT16, (IMAGE_TOKENS, dims.out_width)) for name in names]


def tile_inputs(dims: TileDims) -> list[TensorSpec]:
    """A tiled tower's one input: the normalized tiles [num_blocks, 3, S, S]."""
    side = dims.image_size
    return [TensorSpec(INPUT, TensorProto.FLOAT16, (NUM_BLOCKS, dims.in_channels, side, side))]


def tile_outputs(dims: TileDims) -> list[TensorSpec]:
    """A tiled tower's one output: ``tile_tokens`` rows of the decoder's width per tile, tiles in input order."""
    return [TensorSpec(OUTPUT, TensorProto.FLOAT16, (IMAGE_TOKENS, dims.out_width))]
