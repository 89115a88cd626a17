"""Wall time and peak RSS of exporting a Phi-4-multimodal-shaped checkpoint, vision encoder and LLM (run by hand).

The case: microsoft/Phi-4-multimodal-instruct in the layout transformers 5's native ``Phi4MultimodalForCausalLM``
loads and saves (the Phi-4-mini decoder at ``model.*`` with fused ``qkv_proj`` / ``gate_up_proj`` and a tied head;
the SigLIP tower, its image projection and the two separators at ``model.embed_tokens_extend.image_embed.*``; the
conformer audio encoder and its projections at ``model.embed_tokens_extend.audio_embed.*``), random bf16 weights
(4.74B parameters, 9.49 GB in 2 GB shards), the tiny Phi-4-multimodal checkpoint's tokenizer and chat template,
and its ``preprocessor_config.json`` sized to 448 x 448 crops of 14 x 14 patches. Each export runs alone in its
own process, one after the other, as in ``bench.visual_export_bench``:

    .venv/bin/python -m bench.phi4mm_export_bench [--workdir DIR] [--keep] [--note TEXT] [--no-record]

Run from the checkout's root. Measured runs: bench/results/phi4mm_export_bench.json (each run appends).
Targets: the exports stream weights, so peak RSS stays far below the 0.82 GB float16 tower plus projection and
the 7.7 GB decoder graph (layers and the tied head; plus a 1.2 GB embedding table) they write: visual <= 1 GB,
llm <= 2 GB. Both were met in the first run (visual 0.36 GB, llm 1.8 GB).

Size: the published model is 5.57B parameters (~11.1 GB bf16), but 0.83B of those are its two LoRA adapters
(vision-lora 738 MB, speech-lora 923 MB on the hub: 369M and 461M bf16 parameters, what ranks 256 and 320 on
every layer's qkv / o / gate_up / down give), which the native layout keeps in the ``vision-lora/`` and
``speech-lora/`` folders beside the weights; neither export reads them, so they are not written. 4.74B
(decoder 3.84B, tied; vision tower and projection 0.44B; audio 0.47B) + 0.83B = 5.57B. The
shapes equal those of transformers 5.23's ``Phi4MultimodalForCausalLM`` built from ``CONFIG`` on the meta device
(checked when this bench was written); the names are checked against the tiny checkpoint on every run.

Where the config's values come from:

- Confirmed: the decoder (hidden 3072, intermediate 8192, 32 layers, 24 heads, 8 KV heads, vocab 200064,
  max_position_embeddings 131072, original_max_position_embeddings 4096, rope_theta 10000, partial_rotary_factor
  0.75, LongRoPE long_factor / short_factor (48 each; short all 1.0), rms_norm_eps 1e-5, tie_word_embeddings true,
  bos / pad 199999, sliding_window 262144) from a public TensorRT-LLM unit test that transcribes the checkpoint's
  remote-code config.json, and a public Phi-4-mini config with the same factors; the native config's top level
  (Phi4MultimodalForCausalLM, model_type phi4_multimodal, eos [199999, 200020]) and its whole ``audio_config``
  (hidden 1024, intermediate 1536, 24 blocks, 16 heads, nemo / ext_pw / depthwise channels 1024, input 80,
  time_reduction 8, bias_max_distance 500: not transformers' default 1000) from public configs converted to
  that layout; 5.57B parameters and the two adapter folders' sizes from public listings of the repository.
- Assumed: ``vision_config`` as transformers' ``Phi4MultimodalVisionConfig()`` defaults, which its docstring gives
  as the checkpoint's (SigLIP hidden 1152, 27 layers, 16 heads, intermediate 4304, image / crop 448, patch 14,
  gelu_pytorch_tanh, feature_layer -2, image_token_id 200010); the remote-code config agrees on crop 448; the
  native config's ``vision_config`` itself was not found in the sources searched.
"""

from __future__ import annotations

import json
import logging
import math
import re
import tempfile
from pathlib import Path
from typing import Any

from edgellm_steps.models.demo import make_checkpoint, train_tokenizer

from .export_bench import write_shards
from .visual_export_bench import check_names, run_vlm_bench

log = logging.getLogger("phi4mm_export_bench")

FAMILY = "phi4mm"
NAME = "phi4-multimodal"
LM_HEAD = "lm_head.weight"
#: Where the image and audio embedders keep their tensors.
IMAGE = "model.embed_tokens_extend.image_embed"
AUDIO = "model.embed_tokens_extend.audio_embed"
#: Phi-4-mini's LongRoPE factors as published (rotary dim 96: 48 each).
LONG_FACTOR = [
    1,
    1.118320672,
    1.250641126,
    1.398617824,
    1.564103225,
    1.74916897,
    1.956131817,
    2.187582649,
    2.446418898,
    2.735880826,
    3.059592084,
    3.421605075,
    3.826451687,
    4.279200023,
    4.785517845,
    5.351743533,
    5.984965424,
    6.693110555,
    7.485043894,
    8.370679318,
    9.36110372,
    10.4687158,
    11.70738129,
    13.09260651,
    14.64173252,
    16.37415215,
    18.31155283,
    20.47818807,
    22.90118105,
    25.61086418,
    28.64115884,
    32.03,
    32.1,
    32.13,
    32.23,
    32.6,
    32.61,
    32.64,
    32.66,
    32.7,
    32.71,
    32.93,
    32.97,
    33.28,
    33.49,
    33.5,
    44.16,
    47.77,
]
SHORT_FACTOR = [1.0] * 48
VISION_CONFIG: dict[str, Any] = {
    "model_type": "phi4_multimodal_vision",
    "hidden_size": 1152,
    "intermediate_size": 4304,
    "num_hidden_layers": 27,
    "num_attention_heads": 16,
    "num_channels": 3,
    "image_size": 448,
    "crop_size": 448,
    "patch_size": 14,
    "hidden_act": "gelu_pytorch_tanh",
    "layer_norm_eps": 1e-06,
    "attention_dropout": 0.0,
    "feature_layer": -2,
    "image_token_id": 200010,
}
AUDIO_CONFIG: dict[str, Any] = {
    "model_type": "phi4_multimodal_audio",
    "hidden_size": 1024,
    "intermediate_size": 1536,
    "num_blocks": 24,
    "num_attention_heads": 16,
    "activation": "swish",
    "chunk_size": -1,
    "left_chunk": 18,
    "dropout_rate": 0.0,
    "ext_pw_out_channel": 1024,
    "depthwise_separable_out_channel": 1024,
    "depthwise_multiplier": 1,
    "kernel_size": 3,
    "conv_activation": "swish",
    "input_size": 80,
    "conv_glu_type": "swish",
    "time_reduction": 8,
    "bias_max_distance": 500,
    "bias_symmetric": False,
    "nemo_activation": "relu",
    "nemo_conv_channels": 1024,
    "nemo_final_size": 10,
    "downsample_rate": 1,
    "initializer_range": 0.02,
    "audio_token_id": 200011,
    "feature_layer": -2,
}
#: The text sizes sit at the top level, as transformers 5 saves ``Phi4MultimodalConfig``.
CONFIG: dict[str, Any] = {
    "architectures": ["Phi4MultimodalForCausalLM"],
    "model_type": "phi4_multimodal",
    "dtype": "bfloat16",
    "transformers_version": "5.23.0",
    "vocab_size": 200064,
    "hidden_size": 3072,
    "intermediate_size": 8192,
    "num_hidden_layers": 32,
    "num_attention_heads": 24,
    "num_key_value_heads": 8,
    "max_position_embeddings": 131072,
    "original_max_position_embeddings": 4096,
    "rms_norm_eps": 1e-05,
    "hidden_act": "silu",
    "attention_dropout": 0.0,
    "embd_pdrop": 0.0,
    "resid_pdrop": 0.0,
    "initializer_range": 0.02,
    "sliding_window": 262144,
    "use_cache": True,
    "tie_word_embeddings": True,
    "bos_token_id": 199999,
    "eos_token_id": [199999, 200020],
    "pad_token_id": 199999,
    "rope_parameters": {
        "rope_type": "longrope",
        "rope_theta": 10000.0,
        "partial_rotary_factor": 0.75,
        "original_max_position_embeddings": 4096,
        "long_factor": LONG_FACTOR,
        "short_factor": SHORT_FACTOR,
    },
    "vision_config": VISION_CONFIG,
    "audio_config": AUDIO_CONFIG,
}
#: The processor cuts crops of the tower's size.
PROCESSOR_SIZE = {"height": 448, "width": 448}
TARGETS = {"visual": {"peak_rss_gb": 1.0}, "llm": {"peak_rss_gb": 2.0}}

_AUDIO_BLOCK = re.compile(rf"^{re.escape(AUDIO)}\.encoder\.encoders\.(\d+)\.")


def _linear(prefix: str, out: int, width: int) -> dict[str, tuple[int, ...]]:
    return {f"{prefix}.weight": (out, width), f"{prefix}.bias": (out,)}


def _layer_norm(prefix: str, width: int) -> dict[str, tuple[int, ...]]:
    return {f"{prefix}.weight": (width,), f"{prefix}.bias": (width,)}


def vision_groups(vision: dict[str, Any], out: int) -> list[dict[str, tuple[int, ...]]]:
    """The SigLIP tower under ``image_embed.img_processor.`` (its pooling head too), the projection and the
    separators, one group per layer."""
    w, mlp, side = vision["hidden_size"], vision["intermediate_size"], vision["patch_size"]
    grid = vision["image_size"] // side
    t = f"{IMAGE}.img_processor"
    groups: list[dict[str, tuple[int, ...]]] = [
        {
            f"{t}.embeddings.patch_embedding.weight": (w, vision["num_channels"], side, side),
            f"{t}.embeddings.patch_embedding.bias": (w,),
            f"{t}.embeddings.position_embedding.weight": (grid * grid, w),
        }
    ]
    for layer in range(vision["num_hidden_layers"]):
        p = f"{t}.encoder.layers.{layer}"
        group = _layer_norm(f"{p}.layer_norm1", w) | _layer_norm(f"{p}.layer_norm2", w)
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            group |= _linear(f"{p}.self_attn.{proj}", w, w)
        group |= _linear(f"{p}.mlp.fc1", mlp, w) | _linear(f"{p}.mlp.fc2", w, mlp)
        groups.append(group)
    head = {f"{t}.head.probe": (1, 1, w)}
    head |= {f"{t}.head.attention.in_proj_weight": (3 * w, w), f"{t}.head.attention.in_proj_bias": (3 * w,)}
    head |= _linear(f"{t}.head.attention.out_proj", w, w) | _layer_norm(f"{t}.head.layernorm", w)
    head |= _linear(f"{t}.head.mlp.fc1", mlp, w) | _linear(f"{t}.head.mlp.fc2", w, mlp)
    head |= _layer_norm(f"{t}.post_layernorm", w)
    head |= _linear(f"{IMAGE}.img_projection_up", out, w) | _linear(f"{IMAGE}.img_projection_down", out, out)
    head |= {f"{IMAGE}.global_img_feature_extensor": (1, 1, w), f"{IMAGE}.sub_img_feature_extensor": (1, 1, 1, w)}
    groups.append(head)
    return groups


def audio_groups(audio: dict[str, Any], out: int) -> list[dict[str, tuple[int, ...]]]:
    """The conformer audio encoder (NeMo conv subsampling, relative attention bias, blocks) and its speech
    projections under ``audio_embed.``, one group per block. Neither export reads them; they give the size."""
    h, mlp, channels = audio["hidden_size"], audio["intermediate_size"], audio["nemo_conv_channels"]
    ext, dw_out = audio["ext_pw_out_channel"], audio["depthwise_separable_out_channel"]
    dw_width, kernel = h * audio["depthwise_multiplier"], audio["kernel_size"]
    e = f"{AUDIO}.encoder"
    stem = {f"{e}.encoder_embedding.global_mean": (audio["input_size"],)}
    stem[f"{e}.encoder_embedding.global_invstd"] = (audio["input_size"],)
    stem |= {f"{e}.embed.conv.0.weight": (channels, 1, 3, 3), f"{e}.embed.conv.0.bias": (channels,)}
    # Each further halving: a depthwise 3 x 3 and a pointwise 1 x 1 conv, then the activation (Sequential indices).
    for stage in range(1, int(math.log2(audio["time_reduction"]))):
        depthwise, pointwise = 3 * stage - 1, 3 * stage
        stem |= {
            f"{e}.embed.conv.{depthwise}.weight": (channels, 1, 3, 3),
            f"{e}.embed.conv.{depthwise}.bias": (channels,),
        }
        stem |= {f"{e}.embed.conv.{pointwise}.weight": (channels, channels, 1, 1)}
        stem[f"{e}.embed.conv.{pointwise}.bias"] = (channels,)
    stem |= _linear(f"{e}.embed.out", h, channels * audio["nemo_final_size"])
    buckets = audio["bias_max_distance"] * (1 if audio["bias_symmetric"] else 2)
    stem[f"{e}.relative_attention_bias_layer.bias_values.weight"] = (buckets, audio["num_attention_heads"])
    groups = [stem]
    for block in range(audio["num_blocks"]):
        p = f"{e}.encoders.{block}"
        group: dict[str, tuple[int, ...]] = {}
        for ff in ("feed_forward_in", "feed_forward_out"):
            group |= _layer_norm(f"{p}.{ff}.layer_norm", h)
            group |= _linear(f"{p}.{ff}.gate_up_proj", 2 * mlp, h) | _linear(f"{p}.{ff}.down_proj", h, mlp)
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            group |= _linear(f"{p}.self_attn.{proj}", h, h)
        c = f"{p}.conv"
        group |= _layer_norm(f"{c}.layer_norm", h)
        group |= {f"{c}.glu.b1": (1, ext, 1), f"{c}.glu.b2": (1, ext, 1)}
        group |= {f"{c}.glu.ext_pw_conv_1d.weight": (2 * ext, h, 1), f"{c}.glu.ext_pw_conv_1d.bias": (2 * ext,)}
        group |= {f"{c}.dw_sep_conv_1d.dw_conv.weight": (dw_width, 1, kernel)}
        group[f"{c}.dw_sep_conv_1d.dw_conv.bias"] = (dw_width,)
        group |= {
            f"{c}.dw_sep_conv_1d.pw_conv.weight": (dw_out, dw_width, 1),
            f"{c}.dw_sep_conv_1d.pw_conv.bias": (dw_out,),
        }
        group |= {f"{c}.ext_pw_conv_1d.weight": (ext, h, 1), f"{c}.ext_pw_conv_1d.bias": (ext,)}
        group |= _layer_norm(f"{p}.layer_norm_att", h) | _layer_norm(f"{p}.layer_norm", h)
        groups.append(group)
    width = h * audio["downsample_rate"]
    tail: dict[str, tuple[int, ...]] = {}
    for kind in ("speech", "vision_speech"):
        tail |= _linear(f"{AUDIO}.up_proj_for_{kind}", out, width) | _linear(f"{AUDIO}.down_proj_for_{kind}", out, out)
    groups.append(tail)
    return groups


def decoder_groups(text: dict[str, Any]) -> list[dict[str, tuple[int, ...]]]:
    """The Phi-4-mini decoder at ``model.*``: fused q/k/v and gate/up, no biases; the head only if untied."""
    h, i, v = text["hidden_size"], text["intermediate_size"], text["vocab_size"]
    d = h // text["num_attention_heads"]
    qkv = (text["num_attention_heads"] + 2 * text["num_key_value_heads"]) * d
    groups: list[dict[str, tuple[int, ...]]] = [{"model.embed_tokens.weight": (v, h)}]
    for layer in range(text["num_hidden_layers"]):
        p = f"model.layers.{layer}"
        group = {f"{p}.input_layernorm.weight": (h,), f"{p}.post_attention_layernorm.weight": (h,)}
        group |= {f"{p}.self_attn.qkv_proj.weight": (qkv, h), f"{p}.self_attn.o_proj.weight": (h, h)}
        group |= {f"{p}.mlp.gate_up_proj.weight": (2 * i, h), f"{p}.mlp.down_proj.weight": (h, i)}
        groups.append(group)
    tail = {"model.norm.weight": (h,)}
    if not text["tie_word_embeddings"]:
        tail[LM_HEAD] = (v, h)
    groups.append(tail)
    return groups


def verify_names(tiny: Path, shapes: dict[str, tuple[int, ...]]) -> None:
    """Fail unless the names (and ranks) are the tiny native checkpoint's (:func:`check_names`).

    ``check_names`` folds ``layers.N`` but not the audio encoder's ``encoders.N``, so only the tiny encoder's
    block indices are compared (the others come from the same loop). The tiny checkpoint is untied and the real
    one tied: ``lm_head.weight`` is left out on both sides.
    """
    blocks = json.loads((tiny / "config.json").read_text())["audio_config"]["num_blocks"]

    def compared(name: str) -> bool:
        block = _AUDIO_BLOCK.match(name)
        return name != LM_HEAD and (block is None or int(block.group(1)) < blocks)

    check_names(tiny, {k: s for k, s in shapes.items() if compared(k)})


def checkpoint_groups() -> list[dict[str, tuple[int, ...]]]:
    """Every tensor of the checkpoint, grouped so that no layer or block spans two shards."""
    out = CONFIG["hidden_size"]
    return vision_groups(VISION_CONFIG, out) + decoder_groups(CONFIG) + audio_groups(AUDIO_CONFIG, out)


def write_vlm_checkpoint(directory: Path, shard_bytes: int = 2 << 30) -> int:
    """Write the Phi-4-multimodal-shaped checkpoint shard by shard, with tokenizer, chat template and processor."""
    groups = checkpoint_groups()
    with tempfile.TemporaryDirectory() as tmp:
        tiny = make_checkpoint(Path(tmp) / "tiny", family=FAMILY, dtype="bfloat16")
        verify_names(tiny, {k: s for group in groups for k, s in group.items()})
        processor = json.loads((tiny / "preprocessor_config.json").read_text())
    total = write_shards(groups, directory, shard_bytes)
    (directory / "config.json").write_text(json.dumps(CONFIG, indent=2))
    processor["size"] = dict(PROCESSOR_SIZE)
    processor["patch_size"] = VISION_CONFIG["patch_size"]
    (directory / "preprocessor_config.json").write_text(json.dumps(processor, indent=2) + "\n")
    train_tokenizer(FAMILY).save_pretrained(str(directory))
    return total


def main() -> int:
    return run_vlm_bench(__doc__, module="phi4mm_export_bench", name=NAME, write=write_vlm_checkpoint, targets=TARGETS)


if __name__ == "__main__":
    raise SystemExit(main())
