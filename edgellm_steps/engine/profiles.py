"""TensorRT optimization profiles of an engine (contract section 8), derived from the graph's inputs.

Every input's shape is declared with symbolic dims (LLM names and dims come from
``llm_io``); a profile is a (min, opt, max) value per symbol, so the shapes of all inputs,
LoRA and EAGLE inputs included, follow from one table per profile. The graph says which
table applies: ``inputs_embeds`` makes an LLM engine, ``input`` a vision engine, and
``attention_pos_id`` (EAGLE base and draft only) a tree-attention LLM.

LLM engines, with BS = max batch size, IL = max input length, cap = KV capacity,
R = max LoRA rank, T = EAGLE tree size, pad(n) = n rounded up to a multiple of 32:

| symbol | prefill (profile 0) | decode (profile 1) | decode, EAGLE |
|---|---|---|---|
| batch_size, rope_batch_size | 1 / BS / BS | 1 / BS / BS | same |
| seq_len | 1 / IL/2 / IL | 1 / 1 / 1 | 1 / T/2 / T |
| num_tokens, num_selected_tokens | 1 / 1 / 1 | 1 / 1 / 1 | 1 / T/2 / T |
| q_len, q_len_padded (EAGLE) | 1 / 1 / 1 | - | 1 / T/2 / T and 1 / pad(T/2) / pad(T) |
| kv_cache_start_batch_size | 0 / BS / BS | 1 / BS / BS | same |
| past_len, max_position_embeddings | 0 / cap / cap and cap / cap / cap | same | same |
| LoRA rank dims | 0 / R/2 / R | same | same |

Vision engines (Qwen-VL) have one profile over image tokens, min / (min+max)/2 / max;
the patch count ``hw`` is four times the image tokens (the merger joins 2 x 2 patches).
A tiled tower's (InternVL) is over ``num_blocks`` tiles of 256 image tokens each: its token
limits are whole tiles (min 256, max 3328 by default).
"""

from __future__ import annotations

import onnx

from edgellm_steps.engine.limits import BuildLimits, image_token_limits
from edgellm_steps.errors import EdgeLLMError
from edgellm_steps.export import llm_io, visual_io
from edgellm_steps.models.tile_geometry import RUNTIME_TILE_TOKENS

Shape = tuple[int, ...]
Profile = dict[str, tuple[Shape, Shape, Shape]]
Ranges = dict[str, tuple[int, int, int]]

#: The graph input that says which kind of engine a graph makes.
KIND_INPUTS = {llm_io.INPUTS_EMBEDS: "llm", visual_io.INPUT: "visual"}
#: Present only in EAGLE base and draft graphs, whose decode profile spans a token tree.
TREE_INPUT = llm_io.ATTENTION_POS_ID
#: Tree-attention masks are padded to whole 32-bit words of tree slots.
MASK_ALIGN = 32
#: The Qwen-VL merger turns 2 x 2 patches into one image token.
PATCHES_PER_IMAGE_TOKEN = 4


def _pad(n: int) -> int:
    return -(-n // MASK_ALIGN) * MASK_ALIGN


def symbol_ranges(limits: BuildLimits, phase: str, *, tree: bool = False) -> Ranges:
    """(min, opt, max) of every symbolic dim of an LLM graph in the ``prefill`` or ``decode`` profile."""
    bs, il, cap, rank = limits.max_batch_size, limits.max_input_len, limits.max_kv_cache_capacity, limits.max_lora_rank
    t = limits.max_tree_size
    prefill = phase == "prefill"
    if prefill:
        seq, selected = (1, max(1, il // 2), il), (1, 1, 1)
    else:
        seq = selected = (1, max(1, t // 2), t) if tree else (1, 1, 1)
    ranges = {
        llm_io.BATCH_SIZE: (1, bs, bs),
        llm_io.ROPE_BATCH_SIZE: (1, bs, bs),
        llm_io.SEQ_LEN: seq,
        llm_io.NUM_TOKENS: selected,
        llm_io.KV_START_BATCH_SIZE: (0, bs, bs) if prefill else (1, bs, bs),
        llm_io.PAST_LEN: (0, cap, cap),
        llm_io.PRESENT_LEN: (0, cap, cap),
        llm_io.MAX_POSITIONS: (cap, cap, cap),
        llm_io.LORA_RANK: (0, rank // 2, rank),
    }
    if tree:
        ranges[llm_io.NUM_SELECTED_TOKENS] = selected
        ranges[llm_io.Q_LEN] = selected
        ranges[llm_io.Q_LEN_PADDED] = (1, 1, 1) if prefill else (1, _pad(selected[1]), _pad(selected[2]))
    return ranges


def visual_symbol_ranges(limits: BuildLimits, *, tiled: bool = False) -> Ranges:
    """(min, opt, max) of every symbolic dim of a vision encoder graph (a tiled one's in whole tiles)."""
    limits = image_token_limits(limits, tiled=tiled, where="vision engine")
    low, high = limits.min_image_tokens, limits.max_image_tokens
    if not 1 <= low <= high:
        raise EdgeLLMError(
            f"image token limits min {low} / max {high} are not a range; set min_image_tokens <= max_image_tokens"
        )
    if tiled:
        blocks = (low // RUNTIME_TILE_TOKENS, (low + high) // 2 // RUNTIME_TILE_TOKENS, high // RUNTIME_TILE_TOKENS)
        return {visual_io.NUM_BLOCKS: blocks, visual_io.IMAGE_TOKENS: tuple(RUNTIME_TILE_TOKENS * n for n in blocks)}
    tokens = (low, (low + high) // 2, high)
    return {visual_io.IMAGE_TOKENS: tokens, visual_io.HW: tuple(PATCHES_PER_IMAGE_TOKEN * n for n in tokens)}


def is_tiled(model: onnx.ModelProto) -> bool:
    """A tiled vision tower's graph (InternVL): its input is counted in tiles."""
    return any(d.dim_param == visual_io.NUM_BLOCKS for v in model.graph.input for d in v.type.tensor_type.shape.dim)


def engine_kind(model: onnx.ModelProto) -> str:
    """``llm`` or ``visual``, from the graph's inputs."""
    names = {value.name for value in model.graph.input}
    kinds = {kind for name, kind in KIND_INPUTS.items() if name in names}
    if len(kinds) != 1:
        raise EdgeLLMError(
            f"cannot tell which engine the graph makes: it needs exactly one of the inputs "
            f"{', '.join(KIND_INPUTS)} (LLM or vision encoder), but has {', '.join(sorted(names))}"
        )
    return kinds.pop()


def _dim_range(name: str, dim: onnx.TensorShapeProto.Dimension, ranges: Ranges) -> tuple[int, int, int]:
    if dim.HasField("dim_value"):
        return (dim.dim_value,) * 3
    symbol = dim.dim_param
    if symbol in ranges:
        return ranges[symbol]
    if llm_io.LORA_RANK in ranges and llm_io.is_lora_rank(symbol):
        return ranges[llm_io.LORA_RANK]
    raise EdgeLLMError(f"input {name} has symbolic dim '{symbol}' that no engine profile defines")


def _profile(model: onnx.ModelProto, ranges: Ranges) -> Profile:
    profile = {}
    for value in model.graph.input:
        dims = [_dim_range(value.name, d, ranges) for d in value.type.tensor_type.shape.dim]
        profile[value.name] = tuple(tuple(d[i] for d in dims) for i in range(3))
    return profile


def llm_profiles(model: onnx.ModelProto, limits: BuildLimits) -> list[Profile]:
    """[prefill, decode] profiles: {input name: (min shape, opt shape, max shape)}."""
    tree = any(value.name == TREE_INPUT for value in model.graph.input)
    return [_profile(model, symbol_ranges(limits, phase, tree=tree)) for phase in ("prefill", "decode")]


def visual_profiles(model: onnx.ModelProto, limits: BuildLimits) -> list[Profile]:
    """The one profile of a vision encoder over image tokens (tiles, for a tiled tower)."""
    return [_profile(model, visual_symbol_ranges(limits, tiled=is_tiled(model)))]


def engine_profiles(model: onnx.ModelProto, limits: BuildLimits) -> list[Profile]:
    """The optimization profiles of whichever engine the graph makes."""
    return {"llm": llm_profiles, "visual": visual_profiles}[engine_kind(model)](model, limits)
