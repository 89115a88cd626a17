"""Tiny, real checkpoints made locally: the demo model and the test fixtures.

A checkpoint is a real transformers architecture instantiated from a small
config with seeded random weights, saved with ``save_pretrained``, plus a
byte-level BPE tokenizer trained here on a built-in corpus and the family's
style of chat template. Nothing is downloaded.
"""

from __future__ import annotations

import copy
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

#: Qwen2-VL's ChatML: a message's content is a string or a list of parts; an image (video)
#: part renders as its pad token between the vision start and end tokens.
QWEN_VL_TEMPLATE = (
    "{%- macro render(content) %}"
    "{%- if content is string %}{{- content }}"
    "{%- else %}{%- for part in content %}"
    "{%- if part['type'] == 'image' or 'image' in part or 'image_url' in part %}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif part['type'] == 'video' or 'video' in part %}"
    "{{- '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{%- elif 'text' in part %}{{- part['text'] }}"
    "{%- endif %}"
    "{%- endfor %}{%- endif %}"
    "{%- endmacro %}"
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + render(messages[0]['content']) + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] != 'system' %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + render(message['content']) + '<|im_end|>\\n' }}"
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

#: family -> (transformers config class name, chat template, special tokens, tiny config overrides);
#: vision-language families add model_class, processor_class, vision (vision_config) and token_ids.
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

#: Special tokens of the Qwen-VL tokenizers; the tiny VLM configs point their ``*_token_id`` keys at them.
QWEN_VL_SPECIAL = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
#: Top-level config key -> the special token it names (Qwen2-VL and Qwen2.5-VL configs).
QWEN_VL_TOKEN_IDS = {
    "vision_start_token_id": "<|vision_start|>",
    "vision_end_token_id": "<|vision_end|>",
    "image_token_id": "<|image_pad|>",
    "video_token_id": "<|video_pad|>",
}
#: MRoPE of the tiny VLMs: head_dim 16, so the (temporal, height, width) sections sum to 8.
TINY_MROPE = {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]}

TINY_FAMILIES.update(
    {
        "qwen2_vl": {
            "config_class": "Qwen2VLConfig",
            "model_class": "Qwen2VLForConditionalGeneration",
            "processor_class": "Qwen2VLProcessor",
            "template": QWEN_VL_TEMPLATE,
            "special": QWEN_VL_SPECIAL,
            "bos": None,
            "eos": "<|im_end|>",
            "config": {"rope_parameters": TINY_MROPE},
            # Qwen2-VL's vision tower: embed_dim wide blocks, a merger out to the decoder's hidden size.
            "vision": {"depth": 2, "embed_dim": 32, "num_heads": 2, "mlp_ratio": 2, "hidden_size": 64},
            "token_ids": QWEN_VL_TOKEN_IDS,
        },
        "qwen2_5_vl": {
            "config_class": "Qwen2_5_VLConfig",
            "model_class": "Qwen2_5_VLForConditionalGeneration",
            "processor_class": "Qwen2_5_VLProcessor",
            "template": QWEN_VL_TEMPLATE,
            "special": QWEN_VL_SPECIAL,
            "bos": None,
            "eos": "<|im_end|>",
            "config": {"rope_parameters": TINY_MROPE},
            # Block 1 full attention, block 0 windowed, as Qwen2.5-VL alternates them.
            "vision": {
                "depth": 2,
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_heads": 2,
                "out_hidden_size": 64,
                "fullatt_block_indexes": [1],
                "window_size": 56,
            },
            "token_ids": QWEN_VL_TOKEN_IDS,
        },
    }
)

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

    A vision-language family (``qwen2_vl``, ``qwen2_5_vl``) gets a transformers 5 config
    (``text_config`` with the tiny decoder sizes and ``overrides``, ``vision_config`` with a
    2-block vision tower whose merger outputs the decoder's width), top-level
    ``image_token_id`` / ``video_token_id`` / ``vision_start_token_id`` / ``vision_end_token_id``
    pointing at the tokenizer's own special tokens, and a ``preprocessor_config.json``.
    transformers 5 saves its weights as ``model.embed_tokens`` / ``model.layers.*`` /
    ``model.norm``, ``visual.*`` and ``lm_head``.
    """
    if dtype not in ("float16", "bfloat16", "float32"):
        raise ValueError(f"dtype {dtype!r}: expected float16, bfloat16 or float32")
    import torch
    import transformers

    spec = TINY_FAMILIES[family]
    tokenizer = train_tokenizer(family)
    sizes = copy.deepcopy({**TINY_SIZES, **spec["config"], **overrides})
    sizes.setdefault("vocab_size", len(tokenizer))
    token_ids = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    config_class = getattr(transformers, spec["config_class"])
    if "vision" in spec:
        # A VLM: the decoder sizes go to text_config, the tiny vision tower to vision_config, and
        # the image / video / vision start-end ids to the tokenizer's special tokens.
        vision_ids = {key: tokenizer.convert_tokens_to_ids(token) for key, token in spec["token_ids"].items()}
        config = config_class(text_config={**sizes, **token_ids}, vision_config=spec["vision"], **vision_ids)
    else:
        config = config_class(**sizes, **token_ids)
    torch.manual_seed(seed)
    if "model_class" in spec:
        model = getattr(transformers, spec["model_class"])._from_config(config)
    else:
        model = transformers.AutoModelForCausalLM.from_config(config)
    model = model.to(getattr(torch, dtype))
    output_dir = Path(output_dir)
    save_kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(str(output_dir), **save_kwargs)
    tokenizer.save_pretrained(str(output_dir))
    if "vision" in spec:
        _save_image_processor(output_dir, config, spec["processor_class"])
    log.info("wrote a tiny %s checkpoint (%d parameters) to %s", family, model.num_parameters(), output_dir)
    return output_dir


def _save_image_processor(output_dir: Path, config: Any, processor_class: str) -> None:
    """``preprocessor_config.json`` of the Qwen-VL image processor, sized to the tiny vision tower.

    Written as the hub's Qwen2-VL / Qwen2.5-VL checkpoints hold it (CLIP mean and std). It is
    written directly: transformers' ``Qwen2VLImageProcessor`` needs torchvision and Pillow,
    which this project does not install.
    """
    import json

    vision = config.vision_config
    processor = {
        "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": processor_class,
        "do_resize": True,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "do_convert_rgb": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "patch_size": vision.patch_size,
        "temporal_patch_size": vision.temporal_patch_size,
        "merge_size": vision.spatial_merge_size,
        # Small images: 4 to 64 merged tokens, each covering (patch_size * merge_size)^2 pixels.
        "min_pixels": 4 * (vision.patch_size * vision.spatial_merge_size) ** 2,
        "max_pixels": 64 * (vision.patch_size * vision.spatial_merge_size) ** 2,
    }
    (output_dir / "preprocessor_config.json").write_text(json.dumps(processor, indent=2) + "\n", encoding="utf-8")


def make_eagle3_draft(
    output_dir: str | Path,
    base_dir: str | Path,
    *,
    draft_vocab_size: int = 96,
    seed: int = 0,
    std: float = 0.02,
    qkv_bias: bool = False,
    nested_config: bool = False,
) -> Path:
    """Write a random EAGLE3 draft for the tiny base ``base_dir``, in the published layout.

    ``config.json`` as the published drafts carry it (``LlamaForCausalLMEagle3``, one hidden
    layer, the base's vocabulary, ``draft_vocab_size``, ``target_hidden_size``) and
    ``model.safetensors`` with ``midlayer.*`` (q/k/v/o, gate/up/down, ``input_layernorm``,
    ``hidden_norm``, ``post_attention_layernorm``), ``fc`` [H, 3H], ``norm``, ``lm_head``
    [draft vocab, H], ``d2t`` (int64 offsets, base id = draft id + d2t) and ``t2d`` (bool over
    the base vocabulary). ``qkv_bias`` gives Qwen-style q/k/v biases. ``nested_config`` writes every
    key but ``architectures`` and ``model_type`` under ``text_config``, as drafts trained for a VLM do.
    """
    import json

    import torch
    from safetensors.torch import save_file

    base = json.loads((Path(base_dir) / "config.json").read_text())
    text = base.get("text_config", base)
    hidden, heads = text["hidden_size"], text["num_attention_heads"]
    kv_heads = text.get("num_key_value_heads") or heads
    head_dim = text.get("head_dim") or hidden // heads
    vocab = text["vocab_size"]
    generator = torch.Generator().manual_seed(seed)

    def normal(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=generator) * std).to(torch.float16)

    def norm() -> torch.Tensor:
        return (1 + 0.1 * torch.randn(hidden, generator=generator)).to(torch.float16)

    inter = 2 * hidden
    tensors = {
        "fc.weight": normal(hidden, 3 * hidden),
        "midlayer.input_layernorm.weight": norm(),
        "midlayer.hidden_norm.weight": norm(),
        "midlayer.post_attention_layernorm.weight": norm(),
        "midlayer.self_attn.q_proj.weight": normal(heads * head_dim, 2 * hidden),
        "midlayer.self_attn.k_proj.weight": normal(kv_heads * head_dim, 2 * hidden),
        "midlayer.self_attn.v_proj.weight": normal(kv_heads * head_dim, 2 * hidden),
        "midlayer.self_attn.o_proj.weight": normal(hidden, heads * head_dim),
        "midlayer.mlp.gate_proj.weight": normal(inter, hidden),
        "midlayer.mlp.up_proj.weight": normal(inter, hidden),
        "midlayer.mlp.down_proj.weight": normal(hidden, inter),
        "norm.weight": norm(),
        "lm_head.weight": normal(draft_vocab_size, hidden),
    }
    if qkv_bias:
        for name, rows in (("q", heads * head_dim), ("k", kv_heads * head_dim), ("v", kv_heads * head_dim)):
            tensors[f"midlayer.self_attn.{name}_proj.bias"] = normal(rows)
    base_ids = torch.sort(torch.randperm(vocab, generator=generator)[:draft_vocab_size]).values
    tensors["d2t"] = base_ids - torch.arange(draft_vocab_size)
    t2d = torch.zeros(vocab, dtype=torch.bool)
    t2d[base_ids] = True
    tensors["t2d"] = t2d
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(output_dir / "model.safetensors"), metadata={"format": "pt"})
    rope = text.get("rope_parameters") or {"rope_type": "default", "rope_theta": text.get("rope_theta", 10000.0)}
    config = {
        "architectures": ["LlamaForCausalLMEagle3"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": 1,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-6,
        "max_position_embeddings": text["max_position_embeddings"],
        "rope_theta": rope["rope_theta"],
        "rope_scaling": None,
        "vocab_size": vocab,
        "draft_vocab_size": draft_vocab_size,
        "target_hidden_size": hidden,
        "torch_dtype": "float16",
    }
    if nested_config:
        top = ("architectures", "model_type")
        config = {**{k: config[k] for k in top}, "text_config": {k: v for k, v in config.items() if k not in top}}
    (output_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    log.info("wrote a tiny EAGLE3 draft (draft vocabulary %d) to %s", draft_vocab_size, output_dir)
    return output_dir


def make_lora_adapter(
    output_dir: str | Path,
    base_dir: str | Path,
    target_modules: list[str],
    *,
    seed: int = 0,
    r: int = 4,
    lora_alpha: float = 8,
    b_scale: float = 0.1,
    **options: Any,
):
    """Write a PEFT LoRA adapter for the tiny base ``base_dir`` with random A and B; returns the PEFT model.

    PEFT starts B at zero, which would make every adapter a no-op: ``init_lora_weights=False`` draws
    both, and B is scaled by ``b_scale`` so the delta stays comparable to the base GEMMs' outputs.
    ``options`` go to ``peft.LoraConfig`` (``use_rslora``, ``rank_pattern``, ``use_dora``, ...).
    """
    import peft
    import torch
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    config = peft.LoraConfig(
        r=r, lora_alpha=lora_alpha, target_modules=target_modules, init_lora_weights=False, **options
    )
    peft_model = peft.get_peft_model(model, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.mul_(b_scale)
    peft_model.save_pretrained(str(output_dir))
    log.info("wrote a LoRA adapter (r=%d, %s) to %s", r, ", ".join(target_modules), output_dir)
    return peft_model.eval()
