"""A byte-level BPE tokenizer trained here on the built-in corpus, in a family's style."""

from __future__ import annotations

from typing import Any

from edgellm_steps.models.demo.families import CORPUS, TINY_FAMILIES


def train_tokenizer(family: str, vocab_size: int = 384) -> Any:
    """A byte-level BPE tokenizer trained on :data:`CORPUS`, wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    spec = TINY_FAMILIES[family]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=spec["special"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(CORPUS.splitlines(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=spec["bos"],
        eos_token=spec["eos"],
        pad_token=spec["special"][0],
        **({"extra_special_tokens": spec["extra_special"]} if "extra_special" in spec else {}),
    )
    fast.chat_template = spec["template"]
    return fast
