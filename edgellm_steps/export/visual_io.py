"""The vision encoder graph's inputs and outputs (contract section 7), named once.

The graph builder, the CPU reference's feeds and the engine's optimization profiles all read these.
"""

from __future__ import annotations

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
