"""Tiny, real checkpoints made locally: the demo model and the test fixtures.

A checkpoint is a real transformers architecture instantiated from a small
config with seeded random weights, saved with ``save_pretrained``, plus a
byte-level BPE tokenizer trained here on a built-in corpus and the family's
style of chat template. Nothing is downloaded.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

CORPUS = """\
TensorRT Edge-LLM runs large language models on NVIDIA Jetson Orin and Jetson Thor.
A build system remembers what is already done and rebuilds only what changed.
Quantization trades a little accuracy for a lot of memory: fp8, int8, int4 and nvfp4.
The exporter writes an ONNX graph, an embedding table, a tokenizer and a chat template.
Each engine is built for one GPU, named by its streaming multiprocessor version.
The quick brown fox jumps over the lazy dog while the compiler hums along.
Attention reads the key value cache; rotary embeddings encode each position.
Hello! How are you today? I am fine, thank you. What would you like to build?
Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000 3.14 2.71 42.
"""

CHATML_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] != 'system' %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

LLAMA3_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)

PHI3_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|assistant|>\\n' }}{%- endif %}"
)

#: family -> (transformers config class name, chat template, special tokens, tiny config overrides)
TINY_FAMILIES: dict[str, dict[str, Any]] = {
    "qwen2": {
        "config_class": "Qwen2Config",
        "template": CHATML_TEMPLATE,
        "special": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        "bos": None,
        "eos": "<|im_end|>",
        "config": {},
    },
    "llama": {
        "config_class": "LlamaConfig",
        "template": LLAMA3_TEMPLATE,
        "special": ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        "bos": "<|begin_of_text|>",
        "eos": "<|eot_id|>",
        "config": {},
    },
    "qwen3": {
        "config_class": "Qwen3Config",
        "template": CHATML_TEMPLATE,
        "special": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        "bos": None,
        "eos": "<|im_end|>",
        "config": {"head_dim": 32},
    },
    "phi3": {
        "config_class": "Phi3Config",
        "template": PHI3_TEMPLATE,
        "special": ["<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"],
        "bos": None,
        "eos": "<|end|>",
        "config": {},
    },
}

TINY_SIZES = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
}


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
    )
    fast.chat_template = spec["template"]
    return fast


def make_checkpoint(
    output_dir: str | Path,
    *,
    family: str = "qwen2",
    seed: int = 0,
    max_shard_size: str | None = None,
    dtype: str = "float16",
    **overrides: Any,
) -> Path:
    """Write a tiny random-weight checkpoint of ``family`` with tokenizer and chat template.

    ``dtype`` is what the weights are saved in and ``config.json`` records: ``float16``,
    ``bfloat16`` (what most HF checkpoints ship) or ``float32``.
    """
    if dtype not in ("float16", "bfloat16", "float32"):
        raise ValueError(f"dtype {dtype!r}: expected float16, bfloat16 or float32")
    import torch
    import transformers

    spec = TINY_FAMILIES[family]
    tokenizer = train_tokenizer(family)
    sizes = {**TINY_SIZES, **spec["config"], **overrides}
    sizes.setdefault("vocab_size", len(tokenizer))
    config = getattr(transformers, spec["config_class"])(
        **sizes,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model = model.to(getattr(torch, dtype))
    output_dir = Path(output_dir)
    save_kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(str(output_dir), **save_kwargs)
    tokenizer.save_pretrained(str(output_dir))
    log.info("wrote a tiny %s checkpoint (%d parameters) to %s", family, model.num_parameters(), output_dir)
    return output_dir
