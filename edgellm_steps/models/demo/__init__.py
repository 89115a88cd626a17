"""Tiny, real checkpoints made locally: the demo model and the test fixtures.

A checkpoint is a real transformers architecture instantiated from a small
config with seeded random weights, saved with ``save_pretrained``, plus a
byte-level BPE tokenizer trained here on a built-in corpus and the family's
style of chat template. Nothing is downloaded.
"""

from edgellm_steps.models.demo.adapters import make_lora_adapter
from edgellm_steps.models.demo.block_fp8 import write_block_fp8_checkpoint
from edgellm_steps.models.demo.checkpoints import make_checkpoint
from edgellm_steps.models.demo.drafts import make_eagle3_draft
from edgellm_steps.models.demo.families import QWEN_VL_TEMPLATE, QWEN_VL_TOKEN_IDS, TINY_FAMILIES, TINY_MROPE
from edgellm_steps.models.demo.tokenizer import train_tokenizer

__all__ = [
    "QWEN_VL_TEMPLATE",
    "QWEN_VL_TOKEN_IDS",
    "TINY_FAMILIES",
    "TINY_MROPE",
    "make_checkpoint",
    "make_eagle3_draft",
    "make_lora_adapter",
    "train_tokenizer",
    "write_block_fp8_checkpoint",
]
