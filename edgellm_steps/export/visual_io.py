"""The vision encoder graph's inputs and outputs (contract section 7), named once.

The graph builder, the CPU reference's feeds and the engine's optimization profiles all read these.
"""

from __future__ import annotations

from onnx import TensorProto

from edgellm_steps.export.llm_io import TensorSpec
from edgellm_steps.models.vision_geometry import VisionDims

# Graph I/O names and symbolic dims (contract section 7).
INPUT = "input"
ROTARY_POS_EMB = "rotary_pos_emb"
ATTENTION_MASK = "attention_mask"
WINDOW_ATTENTION_MASK = "window_attention_mask"
WINDOW_INDEX = "window_index"
REVERSE_WINDOW_INDEX = "reverse_window_index"
OUTPUT = "output"
HW = "hw"
IMAGE_TOKENS = "image_token_len"


def visual_inputs(dims: VisionDims, *, windowed: bool) -> list[TensorSpec]:
    """Inputs of the vision encoder graph in contract order: patches, rotary angles, masks, window order."""
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
    return inputs


def visual_outputs(dims: VisionDims) -> list[TensorSpec]:
    """The one output: an embedding per image token."""
    return [TensorSpec(OUTPUT, TensorProto.FLOAT16, (IMAGE_TOKENS, dims.out_width))]
