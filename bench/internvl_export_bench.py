"""Wall time and peak RSS of exporting an InternVL3-2B-shaped checkpoint, vision encoder and LLM (run by hand).

The case: OpenGVLab/InternVL3-2B-hf's config in transformers' ``-hf`` layout (``language_model.model.*``,
``language_model.lm_head.weight``, ``vision_tower.*``, ``multi_modal_projector.*``), random bf16 weights
(2.09B parameters, 4.18 GB in 2 GB shards), the tiny InternVL checkpoint's tokenizer and chat template, and
its ``preprocessor_config.json`` sized to 448 x 448 tiles. Each export runs alone in its own process, one
after the other, as in ``bench.visual_export_bench``:

    .venv/bin/python -m bench.internvl_export_bench [--workdir DIR] [--keep] [--note TEXT] [--no-record]

Run from the checkout's root. Measured runs: bench/results/internvl_export_bench.json (each run appends).
Targets: the exports stream weights, so peak RSS stays far below the 0.63 GB tower and the 3.1 GB decoder
graph (plus its 0.47 GB embedding table) they write: visual <= 1 GB, llm <= 2 GB.

Where the config's values come from (the 2B ``-hf`` config.json itself was not found in the sources searched):

- Confirmed: the hub's file listing of OpenGVLab/InternVL3-2B-hf (one model.safetensors of 4.18 GB,
  InternVLForConditionalGeneration, model_type internvl); the decoder's hidden 1536, 28 layers, 12 heads,
  2 KV heads, vocab 151674, bos 151643 (a public runtime test quoting InternVL3-2B's config); the ``-hf``
  top level (downsample_ratio 0.5, image_seq_length 256, image_token_id 151667, projector_hidden_act gelu)
  from the published InternVL3-1B-hf and -38B-hf configs; the vision tower, InternViT-300M-448px-V2_5 as
  InternVL3-1B and -2B share it (hidden 1024, 24 layers, 16 heads, intermediate 4096, image 448, patch 14,
  norm_type layer_norm eps 1e-6, attention_bias true, use_qk_norm false, use_mean_pooling true, layer
  scale 0.1), from the 1B-hf config.
- Inferred: tie_word_embeddings false, and intermediate 8960: only an untied head with that MLP width gives
  the listing's 4.18 GB (2,088,957,440 bf16 parameters; tied would be 3.71 GB).
- Assumed: rope_theta 1e6, max_position_embeddings 32768, eos 151645, rope_scaling dynamic x2 (as the
  1B-hf and 38B-hf text configs have them), vision_feature_layer -1 and vision_feature_select_strategy
  default (transformers' defaults).
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
from pathlib import Path
from typing import Any

from edgellm_steps.models.demo import make_checkpoint, train_tokenizer
from edgellm_steps.models.families import family_for

from .export_bench import layer_tensors, write_shards
from .visual_export_bench import check_names, run_vlm_bench

log = logging.getLogger("internvl_export_bench")

FAMILY = "internvl"
NAME = "internvl3-2b"
#: Where the ``-hf`` checkpoints keep the decoder (under ``language_model.model.``) and its LM head.
TEXT_PREFIX = "language_model.model."
LM_HEAD = "language_model.lm_head.weight"
TEXT_CONFIG: dict[str, Any] = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "hidden_size": 1536,
    "intermediate_size": 8960,
    "num_hidden_layers": 28,
    "num_attention_heads": 12,
    "num_key_value_heads": 2,
    "vocab_size": 151674,
    "max_position_embeddings": 32768,
    "max_window_layers": 70,
    "rms_norm_eps": 1e-06,
    "hidden_act": "silu",
    "attention_dropout": 0.0,
    "initializer_range": 0.02,
    "rope_theta": 1000000.0,
    "rope_scaling": {"factor": 2.0, "rope_type": "dynamic", "type": "dynamic"},
    "sliding_window": None,
    "use_sliding_window": False,
    "use_cache": True,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "bos_token_id": 151643,
    "eos_token_id": 151645,
}
VISION_CONFIG: dict[str, Any] = {
    "architectures": ["InternVisionModel"],
    "model_type": "internvl_vision",
    "hidden_size": 1024,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "intermediate_size": 4096,
    "hidden_act": "gelu",
    "image_size": [448, 448],
    "patch_size": [14, 14],
    "num_channels": 3,
    "norm_type": "layer_norm",
    "layer_norm_eps": 1e-06,
    "attention_bias": True,
    "use_qk_norm": False,
    "use_mean_pooling": True,
    "use_absolute_position_embeddings": True,
    "use_mask_token": False,
    "layer_scale_init_value": 0.1,
    "initializer_factor": 0.1,
    "initializer_range": 1e-10,
    "attention_dropout": 0.0,
    "dropout": 0.0,
    "hidden_dropout_prob": 0.0,
    "projection_dropout": 0.0,
    "torch_dtype": "bfloat16",
}
CONFIG: dict[str, Any] = {
    "architectures": ["InternVLForConditionalGeneration"],
    "model_type": "internvl",
    "torch_dtype": "bfloat16",
    "transformers_version": "4.52.0.dev0",
    "downsample_ratio": 0.5,
    "image_seq_length": 256,
    "image_token_id": 151667,
    "projector_hidden_act": "gelu",
    "vision_feature_layer": -1,
    "vision_feature_select_strategy": "default",
    "text_config": TEXT_CONFIG,
    "vision_config": VISION_CONFIG,
}
#: The processor cuts tiles of the tower's size.
PROCESSOR_SIZE = {"height": 448, "width": 448}
TARGETS = {"visual": {"peak_rss_gb": 1.0}, "llm": {"peak_rss_gb": 2.0}}

_VISION_LAYER = re.compile(r"^vision_tower\.encoder\.layer\.(\d+)\.")


def vision_groups(vision: dict[str, Any], out: int, shuffle: int = 2) -> list[dict[str, tuple[int, ...]]]:
    """The InternViT tower under ``vision_tower.`` and the projector, one group per layer."""
    w, mlp = vision["hidden_size"], vision["intermediate_size"]
    side = vision["patch_size"][0]
    grid = vision["image_size"][0] // side
    e = "vision_tower.embeddings"
    groups: list[dict[str, tuple[int, ...]]] = [
        {
            f"{e}.cls_token": (1, 1, w),
            f"{e}.position_embeddings": (1, grid * grid + 1, w),
            f"{e}.patch_embeddings.projection.weight": (w, vision["num_channels"], side, side),
            f"{e}.patch_embeddings.projection.bias": (w,),
        }
    ]
    for layer in range(vision["num_hidden_layers"]):
        p = f"vision_tower.encoder.layer.{layer}"
        group = {f"{p}.attention.{proj}.weight": (w, w) for proj in ("q_proj", "k_proj", "v_proj", "projection_layer")}
        group |= {f"{p}.attention.{proj}.bias": (w,) for proj in ("q_proj", "k_proj", "v_proj", "projection_layer")}
        group |= {f"{p}.lambda_1": (w,), f"{p}.lambda_2": (w,)}
        group |= {
            f"{p}.{norm}.{kind}": (w,)
            for norm in ("layernorm_before", "layernorm_after")
            for kind in ("weight", "bias")
        }
        group |= {f"{p}.mlp.fc1.weight": (mlp, w), f"{p}.mlp.fc1.bias": (mlp,)}
        group |= {f"{p}.mlp.fc2.weight": (w, mlp), f"{p}.mlp.fc2.bias": (w,)}
        groups.append(group)
    shuffled = w * shuffle**2
    m = "multi_modal_projector"
    groups.append(
        {
            f"{m}.layer_norm.weight": (shuffled,),
            f"{m}.layer_norm.bias": (shuffled,),
            f"{m}.linear_1.weight": (out, shuffled),
            f"{m}.linear_1.bias": (out,),
            f"{m}.linear_2.weight": (out, out),
            f"{m}.linear_2.bias": (out,),
        }
    )
    return groups


def decoder_groups(text: dict[str, Any]) -> list[dict[str, tuple[int, ...]]]:
    """The Qwen2 decoder (q/k/v biases) as ``export_bench`` lays it out, under ``language_model.model.``."""
    h, v = text["hidden_size"], text["vocab_size"]
    case = {**text, "qkv_bias": True}
    groups = [{f"{TEXT_PREFIX}embed_tokens.weight": (v, h)}]
    for layer in range(text["num_hidden_layers"]):
        groups.append({TEXT_PREFIX + k.removeprefix("model."): s for k, s in layer_tensors(case, layer).items()})
    tail = {f"{TEXT_PREFIX}norm.weight": (h,)}
    if not text["tie_word_embeddings"]:
        tail[LM_HEAD] = (v, h)
    groups.append(tail)
    return groups


def verify_names(tiny: Path, shapes: dict[str, tuple[int, ...]]) -> None:
    """Fail unless the names are the tiny ``-hf`` checkpoint's (:func:`check_names`) and the LM head the family's.

    ``check_names`` folds ``layers.N`` / ``blocks.N`` but not InternViT's ``encoder.layer.N``, so only the
    tiny tower's layer indices are compared (the others come from the same loop). The tiny checkpoint
    ties its head (transformers 5's top-level default), so ``language_model.lm_head.weight`` is checked
    against the family's ``lm_head_for`` instead.
    """
    tiny_config = json.loads((tiny / "config.json").read_text())
    depth = tiny_config["vision_config"]["num_hidden_layers"]
    expected_head = dict(family_for(CONFIG).lm_head_for).get(TEXT_PREFIX)
    if LM_HEAD in shapes and expected_head != LM_HEAD:
        raise SystemExit(f"LM head {LM_HEAD!r} is not the family's {expected_head!r}")

    def compared(name: str) -> bool:
        layer = _VISION_LAYER.match(name)
        return name != LM_HEAD and (layer is None or int(layer.group(1)) < depth)

    check_names(tiny, {k: s for k, s in shapes.items() if compared(k)})


def write_vlm_checkpoint(directory: Path, shard_bytes: int = 2 << 30) -> int:
    """Write the 2B-shaped InternVL3 checkpoint shard by shard, with tokenizer, chat template and processor."""
    groups = vision_groups(VISION_CONFIG, TEXT_CONFIG["hidden_size"]) + decoder_groups(TEXT_CONFIG)
    with tempfile.TemporaryDirectory() as tmp:
        tiny = make_checkpoint(Path(tmp) / "tiny", family=FAMILY, dtype="bfloat16")
        verify_names(tiny, {k: s for group in groups for k, s in group.items()})
        processor = json.loads((tiny / "preprocessor_config.json").read_text())
    total = write_shards(groups, directory, shard_bytes)
    (directory / "config.json").write_text(json.dumps(CONFIG, indent=2))
    processor["size"] = dict(PROCESSOR_SIZE)
    (directory / "preprocessor_config.json").write_text(json.dumps(processor, indent=2) + "\n")
    train_tokenizer(FAMILY).save_pretrained(str(directory))
    return total


def main() -> int:
    return run_vlm_bench(
        __doc__, module="internvl_export_bench", name=NAME, write=write_vlm_checkpoint, targets=TARGETS
    )


if __name__ == "__main__":
    raise SystemExit(main())
