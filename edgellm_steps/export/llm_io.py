"""The LLM graph's inputs and outputs, declared once (contract sections 3.1-3.2).

Tensor names and symbolic dim names are the constants and name builders below;
:func:`llm_inputs` and :func:`llm_outputs` put them together, with element types
and shapes, in contract order. The graph builder, the CPU reference runner and
the engine's optimization profiles all read them from here, so they cannot drift.

This module imports nothing else from the project: the engine step reads it, and
must not depend on how checkpoints are read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from onnx import TensorProto

# Symbolic dims of the standard LLM graph.
BATCH_SIZE = "batch_size"
SEQ_LEN = "seq_len"
NUM_TOKENS = "num_tokens"
PAST_LEN = "past_len"
PRESENT_LEN = "present_kv_cache_len"
ROPE_BATCH_SIZE = "rope_batch_size"
MAX_POSITIONS = "max_position_embeddings"
KV_START_BATCH_SIZE = "kv_cache_start_batch_size"

# Symbolic dims only EAGLE graphs have (contract 3.1 and 5).
NUM_SELECTED_TOKENS = "num_selected_tokens"
Q_LEN = "q_len"
Q_LEN_PADDED = "q_len_padded"
#: The rank dim of LoRA inputs (contract 6). insert-lora names one per module, ``<prefix>.rank``;
#: any dim named ``lora_rank*``, ``*.rank`` or ``*_rank`` is one.
LORA_RANK = "lora_rank"

# Input names, then output names.
INPUTS_EMBEDS = "inputs_embeds"
ROPE_COS_SIN = "rope_rotary_cos_sin"
CONTEXT_LENGTHS = "context_lengths"
LAST_TOKEN_IDS = "last_token_ids"
KVCACHE_START_INDEX = "kvcache_start_index"
#: Inputs of EAGLE base and draft graphs only: each tree token's position, and the bit-packed tree mask.
ATTENTION_POS_ID = "attention_pos_id"
ATTENTION_MASK = "attention_mask"
LOGITS = "logits"
#: Output of EAGLE graphs: the base's three intermediate hidden states, concatenated [B, S, 3H]
#: (the draft's: its pre-norm hidden state at the selected tokens, [B, N, H]).
HIDDEN_STATES = "hidden_states"
#: Inputs of an EAGLE3 draft: the base's hidden states [B, S, 3H_target], and the draft's own
#: previous output [B, S, H] (zeros in the first draft step; then the base's input is zeros).
HIDDEN_STATES_INPUT = "hidden_states_input"
HIDDEN_STATES_FROM_DRAFT = "hidden_states_from_draft"
#: Qwen3-VL's deepstack inputs (contract 3.6): ``deepstack_embeds_i`` [B, S, H] is added to decoder
#: layer i's output; the runtime writes the vision tower's deepstack rows at image tokens, zeros elsewhere.
DEEPSTACK_PREFIX = "deepstack_embeds_"


def past_name(layer: int) -> str:
    """The KV-cache input of decoder layer ``layer``."""
    return f"past_key_values_{layer}"


def present_name(layer: int) -> str:
    """The KV-cache output of decoder layer ``layer``."""
    return f"present_key_values_{layer}"


def deepstack_name(layer: int) -> str:
    """The deepstack input added to the output of decoder layer ``layer``."""
    return f"{DEEPSTACK_PREFIX}{layer}"


def deepstack_count(input_names: list[str]) -> int:
    """How many deepstack inputs a graph with these inputs takes (what the engine records, contract 3.6)."""
    return sum(name.startswith(DEEPSTACK_PREFIX) for name in input_names)


def is_lora_rank(dim: str) -> bool:
    """Whether a symbolic dim is the rank of a LoRA input."""
    return dim.startswith(LORA_RANK) or dim.endswith((".rank", "_rank"))


def lora_a_name(module: str) -> str:
    """The LoRA A input of GEMM ``module`` (float16 [K, rank]); process-lora's key for it is the same."""
    return f"{module}.lora_A.weight"


def lora_b_name(module: str) -> str:
    """The LoRA B input of GEMM ``module`` (float16 [rank, N], alpha/r folded in)."""
    return f"{module}.lora_B.weight"


def lora_rank_dim(module: str) -> str:
    """The symbolic rank dim of GEMM ``module``'s LoRA inputs."""
    return f"{module}.rank"


class GraphDims(Protocol):
    """The model sizes the I/O shapes need; :class:`edgellm_steps.artifacts.checkpoint.DecoderDims` has them."""

    @property
    def num_layers(self) -> int: ...
    @property
    def hidden_size(self) -> int: ...
    @property
    def num_kv_heads(self) -> int: ...
    @property
    def head_dim(self) -> int: ...
    @property
    def rotary_dim(self) -> int: ...
    @property
    def vocab_size(self) -> int: ...
    @property
    def deepstack_layers(self) -> int: ...


@dataclass(frozen=True)
class TensorSpec:
    name: str
    elem_type: int
    dims: tuple[int | str, ...]


def llm_inputs(dims: GraphDims, kv_type: int = TensorProto.FLOAT16, *, eagle_base: bool = False) -> list[TensorSpec]:
    """Graph inputs in contract order; ``kv_type`` is FLOAT8E4M3FN for an fp8 KV cache.

    An EAGLE base graph selects several tokens per sequence and takes the speculation tree:
    ``attention_pos_id`` [B, q_len] and the bit-packed ``attention_mask`` [B, q_len, q_len_padded].
    A Qwen3-VL language model takes its deepstack inputs last, shaped as ``inputs_embeds``.
    """
    kv_dims = (BATCH_SIZE, 2, dims.num_kv_heads, PAST_LEN, dims.head_dim)
    selected = NUM_SELECTED_TOKENS if eagle_base else NUM_TOKENS
    inputs = [
        TensorSpec(INPUTS_EMBEDS, TensorProto.FLOAT16, (BATCH_SIZE, SEQ_LEN, dims.hidden_size)),
        *(TensorSpec(past_name(i), kv_type, kv_dims) for i in range(dims.num_layers)),
        TensorSpec(ROPE_COS_SIN, TensorProto.FLOAT, (ROPE_BATCH_SIZE, MAX_POSITIONS, dims.rotary_dim)),
        TensorSpec(CONTEXT_LENGTHS, TensorProto.INT32, (BATCH_SIZE,)),
        TensorSpec(LAST_TOKEN_IDS, TensorProto.INT64, (BATCH_SIZE, selected)),
        TensorSpec(KVCACHE_START_INDEX, TensorProto.INT32, (KV_START_BATCH_SIZE,)),
    ]
    if eagle_base:
        inputs += [
            TensorSpec(ATTENTION_POS_ID, TensorProto.INT32, (BATCH_SIZE, Q_LEN)),
            TensorSpec(ATTENTION_MASK, TensorProto.INT32, (BATCH_SIZE, Q_LEN, Q_LEN_PADDED)),
        ]
    embeds = (BATCH_SIZE, SEQ_LEN, dims.hidden_size)
    inputs += [TensorSpec(deepstack_name(i), TensorProto.FLOAT16, embeds) for i in range(dims.deepstack_layers)]
    return inputs


def llm_outputs(dims: GraphDims, kv_type: int = TensorProto.FLOAT16, *, eagle_base: bool = False) -> list[TensorSpec]:
    """Graph outputs in contract order; ``kv_type`` as for :func:`llm_inputs`.

    An EAGLE base graph adds ``hidden_states`` [B, S, 3H] (every position) after the logits.
    """
    kv_dims = (BATCH_SIZE, 2, dims.num_kv_heads, PRESENT_LEN, dims.head_dim)
    selected = NUM_SELECTED_TOKENS if eagle_base else NUM_TOKENS
    outputs = [TensorSpec(LOGITS, TensorProto.FLOAT, (BATCH_SIZE, selected, dims.vocab_size))]
    if eagle_base:
        outputs.append(TensorSpec(HIDDEN_STATES, TensorProto.FLOAT16, (BATCH_SIZE, SEQ_LEN, 3 * dims.hidden_size)))
    return outputs + [TensorSpec(present_name(i), kv_type, kv_dims) for i in range(dims.num_layers)]


def draft_inputs(dims: GraphDims, target_hidden_size: int, kv_type: int = TensorProto.FLOAT16) -> list[TensorSpec]:
    """Inputs of an EAGLE3 draft graph in contract order (section 5); ``dims`` are the draft's."""
    standard = llm_inputs(dims, kv_type, eagle_base=True)
    tree = standard[-2:]
    return [
        *standard[:-2],
        TensorSpec(HIDDEN_STATES_INPUT, TensorProto.FLOAT16, (BATCH_SIZE, SEQ_LEN, 3 * target_hidden_size)),
        TensorSpec(HIDDEN_STATES_FROM_DRAFT, TensorProto.FLOAT16, (BATCH_SIZE, SEQ_LEN, dims.hidden_size)),
        *tree,
    ]


def draft_outputs(dims: GraphDims, draft_vocab_size: int, kv_type: int = TensorProto.FLOAT16) -> list[TensorSpec]:
    """Outputs of an EAGLE3 draft graph: log-softmax logits over the draft vocabulary and the hidden
    states, both at the selected tokens, then the presents."""
    kv_dims = (BATCH_SIZE, 2, dims.num_kv_heads, PRESENT_LEN, dims.head_dim)
    return [
        TensorSpec(LOGITS, TensorProto.FLOAT, (BATCH_SIZE, NUM_SELECTED_TOKENS, draft_vocab_size)),
        TensorSpec(HIDDEN_STATES, TensorProto.FLOAT16, (BATCH_SIZE, NUM_SELECTED_TOKENS, dims.hidden_size)),
        *(TensorSpec(present_name(i), kv_type, kv_dims) for i in range(dims.num_layers)),
    ]


def lora_inputs(module: str, in_features: int, out_features: int) -> list[TensorSpec]:
    """The LoRA inputs of GEMM ``module`` (contract 6): A [K, rank] and B [rank, N], float16, one rank dim."""
    rank = lora_rank_dim(module)
    return [
        TensorSpec(lora_a_name(module), TensorProto.FLOAT16, (in_features, rank)),
        TensorSpec(lora_b_name(module), TensorProto.FLOAT16, (rank, out_features)),
    ]
