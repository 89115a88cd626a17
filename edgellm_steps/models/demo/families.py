"""The tiny checkpoints' families: configs, chat templates, special tokens, and the tokenizer corpus."""

from __future__ import annotations

from typing import Any

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

#: Qwen3-VL's text rope: MRoPE sections interleaved over the frequency slots (contract 3.6).
TINY_INTERLEAVED_MROPE = {**TINY_MROPE, "rope_theta": 5000000.0, "mrope_interleaved": True}

TINY_FAMILIES["qwen3_vl"] = {
    "config_class": "Qwen3VLConfig",
    "model_class": "Qwen3VLForConditionalGeneration",
    "processor_class": "Qwen3VLProcessor",
    "template": QWEN_VL_TEMPLATE,
    "special": QWEN_VL_SPECIAL,
    "bos": None,
    "eos": "<|im_end|>",
    # Three decoder layers: each takes one deepstack input.
    "config": {"rope_parameters": TINY_INTERLEAVED_MROPE, "num_hidden_layers": 3, "head_dim": 16},
    # Four blocks, deepstack after blocks 0, 1 and 3 (not simply the first ones, nor only the last);
    # a 4 x 4 grid of learned positions, sampled bilinearly for larger images.
    "vision": {
        "depth": 4,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_heads": 2,
        "num_position_embeddings": 16,
        "deepstack_visual_indexes": [0, 1, 3],
    },
    "token_ids": QWEN_VL_TOKEN_IDS,
    # Qwen3-VL's processor normalizes to [-1, 1].
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
}

#: InternVL-hf's ChatML: an image part renders as one ``<IMG_CONTEXT>`` placeholder, which the processor expands to
#: ``<img>`` + 256 placeholders per tile + ``</img>``.
INTERNVL_TEMPLATE = QWEN_VL_TEMPLATE.replace(
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' }}", "{{- '<IMG_CONTEXT>\\n' }}"
).replace("{{- '<|vision_start|><|video_pad|><|vision_end|>' }}", "{{- '<video>\\n' }}")

#: InternVL3 (transformers' ``-hf`` layout): a Qwen2 decoder, InternViT with a CLS token and learned positions,
#: pixel shuffle 0.5 and an MLP projector. A 64 x 64 tile of 2 x 2 patches is a 32 x 32 grid, which the pixel
#: shuffle halves to 256 tokens per tile, as 448 / 14 does for the published sizes.
TINY_FAMILIES["internvl"] = {
    "config_class": "InternVLConfig",
    "model_class": "InternVLForConditionalGeneration",
    "processor_class": "InternVLProcessor",
    "template": INTERNVL_TEMPLATE,
    "special": ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>", "<video>"],
    # The names InternVLProcessor reads from the tokenizer.
    "extra_special": {
        "start_image_token": "<img>",
        "end_image_token": "</img>",
        "context_image_token": "<IMG_CONTEXT>",
        "video_token": "<video>",
    },
    "bos": None,
    "eos": "<|im_end|>",
    "config": {},
    "vision": {
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 64,
        "image_size": 64,
        "patch_size": 2,
        "attention_bias": True,
        # Wider initial weights than transformers' 0.02, so the blocks (not the patch embedding alone) shape the output.
        "initializer_range": 0.2,
    },
    "token_ids": {"image_token_id": "<IMG_CONTEXT>"},
    "image_mean": [0.485, 0.456, 0.406],
    "image_std": [0.229, 0.224, 0.225],
}

#: Phi-3's chat format with an image part rendered as the tiny tokenizer's image placeholder.
PHI4MM_TEMPLATE = (
    "{%- macro render(content) %}"
    "{%- if content is string %}{{- content }}"
    "{%- else %}{%- for part in content %}"
    "{%- if part['type'] == 'image' %}{{- '<|image|>' }}{%- elif 'text' in part %}{{- part['text'] }}{%- endif %}"
    "{%- endfor %}{%- endif %}"
    "{%- endmacro %}"
    "{%- for message in messages %}"
    "{{- '<|' + message['role'] + '|>' + render(message['content']) + '<|end|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|assistant|>' }}{%- endif %}"
)

#: Phi-4-multimodal as transformers 5 loads it natively (``Phi4MultimodalForCausalLM``): the Phi-3 decoder's sizes
#: at the top level of the config, a SigLIP tower (64 x 64 tiles of 2 x 2 patches: a 32 x 32 grid, pooled 2 x 2 to
#: 256 tokens, as 448 / 14 is) and a token-sized audio encoder the exports never read.
TINY_FAMILIES["phi4mm"] = {
    "config_class": "Phi4MultimodalConfig",
    "model_class": "Phi4MultimodalForCausalLM",
    "processor_class": "Phi4MultimodalProcessor",
    "template": PHI4MM_TEMPLATE,
    "special": ["<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|image|>", "<|audio|>"],
    "bos": None,
    "eos": "<|end|>",
    # The text sizes sit at the top level of the config, beside vision_config and audio_config.
    "flat_text": True,
    "config": {"original_max_position_embeddings": 256},
    "vision": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 3,
        "num_attention_heads": 2,
        "image_size": 64,
        "crop_size": 64,
        "patch_size": 2,
    },
    # transformers draws the tower's matrices with unit variance: drawn again at a trained tower's scale.
    "redraw": ("model.embed_tokens_extend.image_embed", 0.15),
    "audio": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_blocks": 1,
        "num_attention_heads": 2,
        "ext_pw_out_channel": 32,
        "depthwise_separable_out_channel": 32,
        "nemo_conv_channels": 32,
    },
    # Phi-4-multimodal keeps the placeholder ids in its sub-configs.
    "token_ids": {"image_token_id": "<|image|>"},
    "audio_token_ids": {"audio_token_id": "<|audio|>"},
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
}

TINY_SIZES = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
}
