"""Wall time and peak RSS of exporting a Qwen3-VL-8B-shaped checkpoint, vision encoder and LLM (run by hand).

The case: Qwen/Qwen3-VL-8B-Instruct's public config in the transformers 5 layout (``model.language_model.*``,
``model.visual.*``), random bf16 weights (8.8B parameters, 17.5 GB in 2 GB shards), a locally trained
tokenizer and the hub's processor sizes. Each export runs alone in its own process, one after the other,
as in ``bench.visual_export_bench``:

    .venv/bin/python -m bench.qwen3_vl_export_bench [--workdir DIR] [--keep] [--note TEXT] [--no-record]

Run from the checkout's root. Measured runs: bench/results/qwen3_vl_export_bench.json (each run appends).
Targets: the exports stream weights, so peak RSS stays far below the 1.2 GB tower and the 16 GB decoder
they write: visual <= 1 GB, llm <= 2 GB.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any

from edgellm_steps.models.demo import QWEN_VL_TEMPLATE, make_checkpoint, train_tokenizer

from .export_bench import write_shards
from .visual_export_bench import check_names, run_vlm_bench

log = logging.getLogger("qwen3_vl_export_bench")

FAMILY = "qwen3_vl"
NAME = "qwen3-vl-8b"
TEXT_CONFIG: dict[str, Any] = {
    "model_type": "qwen3_vl_text",
    "hidden_size": 4096,
    "intermediate_size": 12288,
    "num_hidden_layers": 36,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 151936,
    "max_position_embeddings": 262144,
    "rms_norm_eps": 1e-06,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "rope_parameters": {
        "rope_type": "default",
        "rope_theta": 5000000.0,
        "mrope_section": [24, 20, 20],
        "mrope_interleaved": True,
    },
}
VISION_CONFIG: dict[str, Any] = {
    "model_type": "qwen3_vl_vision",
    "depth": 27,
    "hidden_size": 1152,
    "intermediate_size": 4304,
    "num_heads": 16,
    "out_hidden_size": 4096,
    "patch_size": 16,
    "temporal_patch_size": 2,
    "spatial_merge_size": 2,
    "in_channels": 3,
    "num_position_embeddings": 2304,
    "deepstack_visual_indexes": [8, 16, 24],
    "hidden_act": "gelu_pytorch_tanh",
}
CONFIG: dict[str, Any] = {
    "architectures": ["Qwen3VLForConditionalGeneration"],
    "model_type": "qwen3_vl",
    "dtype": "bfloat16",
    "image_token_id": 151655,
    "video_token_id": 151656,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
    "tie_word_embeddings": False,
    "text_config": TEXT_CONFIG,
    "vision_config": VISION_CONFIG,
}
PROCESSOR_SIZES = {"patch_size": 16, "merge_size": 2, "temporal_patch_size": 2}
TARGETS = {"visual": {"peak_rss_gb": 1.0}, "llm": {"peak_rss_gb": 2.0}}


def _merger(prefix: str, norm_width: int, merged: int, out: int) -> dict[str, tuple[int, ...]]:
    return {
        f"{prefix}.norm.weight": (norm_width,),
        f"{prefix}.norm.bias": (norm_width,),
        f"{prefix}.linear_fc1.weight": (merged, merged),
        f"{prefix}.linear_fc1.bias": (merged,),
        f"{prefix}.linear_fc2.weight": (out, merged),
        f"{prefix}.linear_fc2.bias": (out,),
    }


def vision_groups(vision: dict[str, Any]) -> list[dict[str, tuple[int, ...]]]:
    """The tower's tensors under ``model.visual.``, one group per block."""
    w, mlp, out = vision["hidden_size"], vision["intermediate_size"], vision["out_hidden_size"]
    patch = (w, vision["in_channels"], vision["temporal_patch_size"], vision["patch_size"], vision["patch_size"])
    merged = w * vision["spatial_merge_size"] ** 2
    v = "model.visual"
    groups: list[dict[str, tuple[int, ...]]] = [
        {
            f"{v}.patch_embed.proj.weight": patch,
            f"{v}.patch_embed.proj.bias": (w,),
            f"{v}.pos_embed.weight": (vision["num_position_embeddings"], w),
        }
    ]
    for block in range(vision["depth"]):
        p = f"{v}.blocks.{block}"
        group = {f"{p}.{norm}.{kind}": (w,) for norm in ("norm1", "norm2") for kind in ("weight", "bias")}
        group |= {f"{p}.attn.qkv.weight": (3 * w, w), f"{p}.attn.qkv.bias": (3 * w,)}
        group |= {f"{p}.attn.proj.weight": (w, w), f"{p}.attn.proj.bias": (w,)}
        group |= {f"{p}.mlp.linear_fc1.weight": (mlp, w), f"{p}.mlp.linear_fc1.bias": (mlp,)}
        group |= {f"{p}.mlp.linear_fc2.weight": (w, mlp), f"{p}.mlp.linear_fc2.bias": (w,)}
        groups.append(group)
    groups.append(_merger(f"{v}.merger", w, merged, out))
    for k in range(len(vision["deepstack_visual_indexes"])):
        groups.append(_merger(f"{v}.deepstack_merger_list.{k}", merged, merged, out))
    return groups


def decoder_groups(text: dict[str, Any]) -> list[dict[str, tuple[int, ...]]]:
    """The Qwen3 decoder under ``model.language_model.``: q/k norms, no biases."""
    h, i, d, v = text["hidden_size"], text["intermediate_size"], text["head_dim"], text["vocab_size"]
    q, kv = text["num_attention_heads"] * d, text["num_key_value_heads"] * d
    lm = "model.language_model"
    groups: list[dict[str, tuple[int, ...]]] = [{f"{lm}.embed_tokens.weight": (v, h)}]
    for layer in range(text["num_hidden_layers"]):
        p = f"{lm}.layers.{layer}"
        group = {f"{p}.input_layernorm.weight": (h,), f"{p}.post_attention_layernorm.weight": (h,)}
        group |= {f"{p}.self_attn.q_proj.weight": (q, h), f"{p}.self_attn.k_proj.weight": (kv, h)}
        group |= {f"{p}.self_attn.v_proj.weight": (kv, h), f"{p}.self_attn.o_proj.weight": (h, q)}
        group |= {f"{p}.self_attn.q_norm.weight": (d,), f"{p}.self_attn.k_norm.weight": (d,)}
        group |= {f"{p}.mlp.gate_proj.weight": (i, h), f"{p}.mlp.up_proj.weight": (i, h)}
        group[f"{p}.mlp.down_proj.weight"] = (h, i)
        groups.append(group)
    groups.append({f"{lm}.norm.weight": (h,), "lm_head.weight": (v, h)})
    return groups


def write_vlm_checkpoint(directory: Path, shard_bytes: int = 2 << 30) -> int:
    """Write the 8B-shaped Qwen3-VL checkpoint shard by shard, with tokenizer, chat template and processor."""
    groups = vision_groups(VISION_CONFIG) + decoder_groups(TEXT_CONFIG)
    with tempfile.TemporaryDirectory() as tmp:
        tiny = make_checkpoint(Path(tmp) / "tiny", family=FAMILY, dtype="bfloat16")
        check_names(tiny, {k: s for group in groups for k, s in group.items()}, keep_lm_head=True)
        processor = json.loads((tiny / "preprocessor_config.json").read_text())
    total = write_shards(groups, directory, shard_bytes)
    (directory / "config.json").write_text(json.dumps(CONFIG, indent=2))
    processor.update(PROCESSOR_SIZES)
    for key in ("min_pixels", "max_pixels"):
        processor.pop(key, None)
    (directory / "preprocessor_config.json").write_text(json.dumps(processor, indent=2) + "\n")
    tokenizer = train_tokenizer(FAMILY)
    tokenizer.chat_template = QWEN_VL_TEMPLATE
    tokenizer.save_pretrained(str(directory))
    return total


def main() -> int:
    return run_vlm_bench(
        __doc__, module="qwen3_vl_export_bench", name=NAME, write=write_vlm_checkpoint, targets=TARGETS
    )


if __name__ == "__main__":
    raise SystemExit(main())
