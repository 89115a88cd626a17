"""EAGLE3 facts: whether a draft fits its base (read from the two configs only, so planning can ask it),
and which of the base's hidden states a draft reads."""

from __future__ import annotations

from typing import Any

from edgellm_steps.artifacts.checkpoint import decoder_dims, draft_widths
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


def eagle_hidden_state_indices(num_layers: int) -> tuple[int, int, int]:
    """Which HF ``output_hidden_states`` entries an EAGLE3 base exposes (contract 5): [2, (n-1)//2, n-4], n = L+1.

    Entry 0 is the input embeddings, entry i (1 <= i < L) the output of decoder layer i-1, entry L
    the final norm's output. Negative values count from the end, as Python (and HF) index.
    """
    n = num_layers + 1
    return tuple(i % n for i in (2, (n - 1) // 2, n - 4))
