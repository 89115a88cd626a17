"""Engine build limits: the sizes an engine's optimization profiles are built for (contract section 8).

The workflow's ``build:`` config section and edgellm-build-engine's flags both fill :class:`BuildLimits`;
:data:`LIMITS_READ` says which of them each kind of engine reads.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from edgellm_steps.errors import ConfigError
from edgellm_steps.models.tile_geometry import RUNTIME_TILE_TOKENS


@dataclass(frozen=True)
class BuildLimits:
    """Engine build limits (contract section 8); the defaults are the contract's."""

    max_batch_size: int = 4
    max_input_len: int = 1024
    max_kv_cache_capacity: int = 4096
    max_lora_rank: int = 0
    #: EAGLE base and draft engines: tokens of the speculation tree in one decode step.
    max_tree_size: int = 60
    #: Vision engines: image tokens in one run (all images), and per image; None: the tower's default
    #: (:data:`IMAGE_TOKEN_DEFAULTS`), filled in by :func:`image_token_limits`.
    min_image_tokens: int | None = None
    max_image_tokens: int | None = None
    max_image_tokens_per_image: int | None = None


#: The build limits each kind of engine reads (changing another leaves it up to date).
LIMITS_READ = {
    "llm": ("max_batch_size", "max_input_len", "max_kv_cache_capacity", "max_lora_rank", "max_tree_size"),
    "visual": ("min_image_tokens", "max_image_tokens", "max_image_tokens_per_image"),
}

#: The vision engine's image-token limits.
IMAGE_LIMITS = ("min_image_tokens", "max_image_tokens", "max_image_tokens_per_image")
#: Their defaults by tower (tiled or not): Qwen-VL's are the contract's (min 4, max 1024, per image 512); a
#: tiled tower (InternVL) runs whole 256-token tiles, from one tile up to a 12-tile image and its thumbnail.
IMAGE_TOKEN_DEFAULTS = {
    False: (4, 1024, 512),
    True: (RUNTIME_TILE_TOKENS, 13 * RUNTIME_TILE_TOKENS, 13 * RUNTIME_TILE_TOKENS),
}


def image_token_limits(limits: BuildLimits, *, tiled: bool, where: str) -> BuildLimits:
    """``limits`` with the image-token limits the tower's defaults where unset, checked for a tiled tower.

    A tiled tower's engine runs whole tiles, so each limit must be a multiple of 256 tokens (refused in one
    line otherwise, naming the nearest multiples).
    """
    defaults = dict(zip(IMAGE_LIMITS, IMAGE_TOKEN_DEFAULTS[tiled], strict=True))
    filled = replace(limits, **{key: defaults[key] for key in IMAGE_LIMITS if getattr(limits, key) is None})
    if tiled:
        for key in IMAGE_LIMITS:
            value = getattr(filled, key)
            if value % RUNTIME_TILE_TOKENS or value < RUNTIME_TILE_TOKENS:
                up = max(1, -(-value // RUNTIME_TILE_TOKENS)) * RUNTIME_TILE_TOKENS
                raise ConfigError(
                    f"{where}: build.{key} is {value}, but an InternVL vision engine runs whole tiles of "
                    f"{RUNTIME_TILE_TOKENS} image tokens; use a multiple of {RUNTIME_TILE_TOKENS} (e.g. {up})"
                )
    return filled
