"""reduce-vocab: choose the token ids an LLM export keeps in its lm_head (contract section 4, ``vocab_map``).

A large vocabulary makes the lm_head the biggest GEMM of a decode step; most ids never
occur in a deployment's text. The kept ids are: every special token of the tokenizer (and
the config's bos / eos / pad ids), every base id an EAGLE3 draft's ``d2t`` reaches (the
draft proposes only those, so the base must score them), then the most frequent ids of a
text corpus (the built-in offline corpus, or a local file / directory) until ``size``.
``vocab_map.safetensors`` holds them as int32, ascending.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from edgellm_steps.artifacts import steps
from edgellm_steps.artifacts.atomic import staged_directory
from edgellm_steps.artifacts.manifest import write_manifest
from edgellm_steps.artifacts.sources import resolve_source
from edgellm_steps.errors import SourceError
from edgellm_steps.export.vocab_map import VOCAB_MAP_FILE
from edgellm_steps.quant.checkpoint_record import open_checkpoint

log = logging.getLogger(__name__)


def required_ids(tokenizer: Any, hf_config: dict, draft_dir: Path | None) -> set[int]:
    """Ids every reduced vocabulary keeps: special tokens, the config's token ids, the draft's targets."""
    keep = set(tokenizer.get_added_tokens_decoder())  # special and other added tokens: id -> token
    text = hf_config.get("text_config", hf_config)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        for config in (hf_config, text):
            value = config.get(key)
            keep |= set(value if isinstance(value, list) else [value] if isinstance(value, int) else [])
    if draft_dir is not None:
        from edgellm_steps.artifacts.draft_weights import open_draft_store

        d2t = open_draft_store(draft_dir).get("d2t").numpy().astype(np.int64).reshape(-1)
        keep |= set((np.arange(len(d2t)) + d2t).tolist())
    return keep


def token_frequencies(tokenizer: Any, corpus: str | None) -> Counter:
    """How often each id occurs when ``tokenizer`` (a ``tokenizers.Tokenizer``) encodes the corpus."""
    from edgellm_steps.quant.calibration import load_corpus

    counts: Counter = Counter()
    for encoding in tokenizer.encode_batch(load_corpus(corpus), add_special_tokens=False):
        counts.update(encoding.ids)
    return counts


def choose_vocab(vocab_size: int, size: int, required: set[int], counts: Counter) -> np.ndarray:
    """``size`` ascending ids: all of ``required``, then the most frequent (ties by lower id)."""
    required = {i for i in required if 0 <= i < vocab_size}
    if size < len(required):
        raise SourceError(
            f"a reduced vocabulary of {size} cannot hold the {len(required)} ids it must keep (special tokens and "
            "the draft's targets); raise the size"
        )
    if size > vocab_size:
        raise SourceError(f"a reduced vocabulary of {size} is larger than the model's {vocab_size}")
    ranked = sorted((i for i in counts if i not in required and i < vocab_size), key=lambda i: (-counts[i], i))
    chosen = set(required) | set(ranked[: size - len(required)])
    rest = (i for i in range(vocab_size) if i not in chosen)  # unseen ids by id, if the corpus runs short
    while len(chosen) < size:
        chosen.add(next(rest))
    return np.array(sorted(chosen), dtype=np.int32)


def reduce_vocab(
    model_dir: str | Path,
    output_dir: str | Path,
    *,
    size: int,
    draft_dir: str | Path | None = None,
    corpus: str | None = None,
) -> Path:
    """Write ``vocab_map.safetensors`` (and a manifest) for ``model_dir`` into ``output_dir``."""
    from safetensors.numpy import save_file
    from tokenizers import Tokenizer

    opened = open_checkpoint(model_dir)
    checkpoint, hf_config, vocab_size = opened.path, opened.hf_config, opened.dims.vocab_size
    draft = resolve_source(str(draft_dir), allow_download=True) if draft_dir else None
    tokenizer = Tokenizer.from_file(str(checkpoint / "tokenizer.json"))
    vocab_map = choose_vocab(
        vocab_size, size, required_ids(tokenizer, hf_config, draft), token_frequencies(tokenizer, corpus)
    )
    log.info("kept %d of %d ids", len(vocab_map), vocab_size)
    output_dir = Path(output_dir)
    with staged_directory(output_dir) as staging:
        save_file({"vocab_map": vocab_map}, str(staging / VOCAB_MAP_FILE))
        write_manifest(staging, step=steps.REDUCE_VOCAB, parameters={"size": size, "corpus": corpus})
    return output_dir / VOCAB_MAP_FILE
