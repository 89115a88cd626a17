"""Engine build limits: the sizes an engine's optimization profiles are built for (contract section 8).

The workflow's ``build:`` config section and edgellm-build-engine's flags both fill :class:`BuildLimits`;
:data:`LIMITS_READ` says which of them each kind of engine reads.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BuildLimits:
    """Engine build limits (contract section 8); the defaults are the contract's."""

    max_batch_size: int = 4
    max_input_len: int = 1024
    max_kv_cache_capacity: int = 4096
    max_lora_rank: int = 0
    #: EAGLE base and draft engines: tokens of the speculation tree in one decode step.
    max_tree_size: int = 60
    #: Vision engines: image tokens in one run (all images), and per image.
    min_image_tokens: int = 4
    max_image_tokens: int = 1024
    max_image_tokens_per_image: int = 512


#: The build limits each kind of engine reads (changing another leaves it up to date).
LIMITS_READ = {
    "llm": ("max_batch_size", "max_input_len", "max_kv_cache_capacity", "max_lora_rank", "max_tree_size"),
    "visual": ("min_image_tokens", "max_image_tokens", "max_image_tokens_per_image"),
}
