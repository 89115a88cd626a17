"""EAGLE3 facts: whether a draft fits its base (read from the two configs only, so planning can ask it),
and which of the base's hidden states a draft reads."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from edgellm_steps.artifacts.checkpoint import DecoderDims, decoder_dims, draft_widths
from edgellm_steps.errors import SourceError
from edgellm_steps.models.families import EAGLE3_DRAFT


def check_draft_fits(draft_config: dict[str, Any], base_config: dict[str, Any], where: str) -> tuple[int, int]:
    """(target hidden size, draft vocabulary size) of a draft that fits its base, or a one-line refusal."""
    architectures = draft_config.get("architectures") or []
    if not set(architectures) & set(EAGLE3_DRAFT.architectures):
        raise SourceError(
            f"{where} is not an EAGLE3 draft (architectures {architectures}); "
            f"expected one of {', '.join(EAGLE3_DRAFT.architectures)}"
        )
    dims, base = decoder_dims(draft_config), decoder_dims(base_config)
    target, draft_vocab = draft_widths(draft_config)
    if target != base.hidden_size:
        raise SourceError(
            f"{where}: the draft reads hidden states of width {target} (target_hidden_size), but the base's "
            f"hidden size is {base.hidden_size}; pair the draft with the base it was trained for"
        )
    if dims.vocab_size != base.vocab_size:
        raise SourceError(
            f"{where}: the draft's vocab_size {dims.vocab_size} differs from the base's {base.vocab_size}; "
            "pair the draft with the base it was trained for"
        )
    if dims.num_layers != 1:
        raise SourceError(f"{where}: an EAGLE3 draft has one decoder layer (midlayer), not {dims.num_layers}")
    return target, draft_vocab


def check_eagle_base(dims: DecoderDims, where: str) -> None:
    """Refuse an EAGLE3 base whose decoder adds deepstack inputs (Qwen3-VL).

    Which hidden states such a base hands its draft (before or after a layer's deepstack
    addition) is not settled by the contract, and a draft trained on the other would speculate
    badly without any error; so none is built.
    """
    if dims.deepstack_layers:
        raise SourceError(
            f"{where}: EAGLE3 speculative decoding on a deepstack language model (Qwen3-VL) is not supported; "
            "remove the draft from this model"
        )


#: The dtypes a draft's ``d2t`` may hold, as safetensors and torch name them: integer offsets.
D2T_DTYPES = frozenset({"I64", "I32", "int64", "int32"})


def check_d2t(
    read: Callable[[], np.ndarray], dtype: str | None, draft_vocab: int, base_vocab: int, where: str
) -> np.ndarray:
    """The draft-to-base offsets as int32, checked: integers, one per draft id, every base id in the base vocabulary.

    ``dtype`` is the tensor's stored dtype, None when the draft has no ``d2t``; ``read`` reads its
    values, called only for an integer dtype (a float table cast to integers would silently shift
    ids; a bfloat16 one cannot even be read by numpy).
    """
    if dtype is None:
        raise SourceError(f"{where} has no d2t tensor (draft id -> base id offsets); is it a complete EAGLE3 draft?")
    if dtype not in D2T_DTYPES:
        raise SourceError(
            f"{where}: d2t is {dtype}, but it holds integer offsets (base id = draft id + d2t); "
            "re-save the draft with d2t as int64"
        )
    offsets = np.asarray(read()).astype(np.int64).reshape(-1)
    if offsets.shape[0] != draft_vocab:
        raise SourceError(
            f"{where}: d2t has {offsets.shape[0]} entries but draft_vocab_size is {draft_vocab}; "
            "pair the draft's config.json with its own weights"
        )
    base_ids = np.arange(draft_vocab) + offsets
    if draft_vocab and (base_ids.min() < 0 or base_ids.max() >= base_vocab):
        raise SourceError(
            f"{where}: d2t maps draft ids outside the base vocabulary of {base_vocab}; "
            "pair the draft with the base it was trained for"
        )
    return offsets.astype(np.int32)


def eagle_hidden_state_indices(num_layers: int) -> tuple[int, int, int]:
    """Which HF ``output_hidden_states`` entries an EAGLE3 base exposes (contract 5): [2, (n-1)//2, n-4], n = L+1.

    Entry 0 is the input embeddings, entry i (1 <= i < L) the output of decoder layer i-1, entry L
    the final norm's output. Negative values count from the end, as Python (and HF) index.
    """
    n = num_layers + 1
    return tuple(i % n for i in (2, (n - 1) // 2, n - 4))
