"""Wall time and peak RSS of exporting a Qwen2.5-VL-3B-shaped checkpoint, vision encoder and LLM (run by hand).

The case: Qwen/Qwen2.5-VL-3B-Instruct's public config in the transformers 5 layout, random bf16 weights
(3.75B parameters, 7.5 GB in 2 GB shards), a locally trained tokenizer and the hub's processor config.
Each export runs alone in its own process, one after the other:

    python -m edgellm_steps.cli.export_visual --model_dir CKPT --output_dir OUT/visual
    python -m edgellm_steps.cli.export_llm --model_dir CKPT --output_dir OUT/llm

    .venv/bin/python -m bench.visual_export_bench [--workdir DIR] [--keep] [--note TEXT] [--no-record]

Run from the checkout's root. Measured runs (generation, visual, llm, with their conditions):
bench/results/visual_export_bench.json (each run appends to it).
Targets: visual <= 8 s, <= 0.6 GB; llm <= 45 s, <= 1.4 GB. The exports stream weights, so peak RSS must
stay far below the 1.3 GB tower and the 6.2 GB decoder they write.

Peak RSS is each export process's own ru_maxrss (``os.wait4``); the checkpoint is generated in a
separate process, as in ``bench.export_bench``, so neither export inherits the generator's memory.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from safetensors import safe_open

from edgellm_steps.models.demo import QWEN_VL_TEMPLATE, make_checkpoint, train_tokenizer

from .common import bench_parser, measure_command, module_command, print_export_table, record, run_export, run_record
from .export_bench import layer_tensors, write_shards

log = logging.getLogger("visual_export_bench")

FAMILY = "qwen2_5_vl"
#: Qwen2.5-VL-3B-Instruct's decoder (text_config of the transformers 5 layout).
TEXT_CONFIG: dict[str, Any] = {
    "model_type": "qwen2_5_vl_text",
    "hidden_size": 2048,
    "intermediate_size": 11008,
    "num_hidden_layers": 36,
    "num_attention_heads": 16,
    "num_key_value_heads": 2,
    "vocab_size": 151936,
    "max_position_embeddings": 128000,
    "rms_norm_eps": 1e-06,
    "hidden_act": "silu",
    "tie_word_embeddings": True,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
}
#: Qwen2.5-VL-3B-Instruct's vision tower.
VISION_CONFIG: dict[str, Any] = {
    "model_type": "qwen2_5_vl_vision",
    "depth": 32,
    "hidden_size": 1280,
    "intermediate_size": 3420,
    "num_heads": 16,
    "out_hidden_size": 2048,
    "patch_size": 14,
    "temporal_patch_size": 2,
    "spatial_merge_size": 2,
    "in_channels": 3,
    "window_size": 112,
    "fullatt_block_indexes": [7, 15, 23, 31],
    "hidden_act": "silu",
    "tokens_per_second": 2,
}
CONFIG: dict[str, Any] = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"],
    "model_type": "qwen2_5_vl",
    "dtype": "bfloat16",
    "image_token_id": 151655,
    "video_token_id": 151656,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
    "tie_word_embeddings": True,
    "text_config": TEXT_CONFIG,
    "vision_config": VISION_CONFIG,
}
#: The hub processor's sizes (the tiny checkpoint's preprocessor_config.json caps max_pixels for tiny images).
PROCESSOR_SIZES = {
    "patch_size": 14,
    "merge_size": 2,
    "temporal_patch_size": 2,
    "min_pixels": 3136,
    "max_pixels": 12845056,
}
#: Reference limits per export (see the module docstring).
TARGETS = {"visual": {"wall_s": 8, "peak_rss_gb": 0.6}, "llm": {"wall_s": 45, "peak_rss_gb": 1.4}}
EXPORTS = {"visual": "edgellm_steps.cli.export_visual", "llm": "edgellm_steps.cli.export_llm"}


def vision_groups(vision: dict[str, Any]) -> list[dict[str, tuple[int, ...]]]:
    """The tower's tensors under ``visual.`` (transformers 5 names), one group per block so no block spans shards."""
    w, mlp, out = vision["hidden_size"], vision["intermediate_size"], vision["out_hidden_size"]
    patch = (w, vision["in_channels"], vision["temporal_patch_size"], vision["patch_size"], vision["patch_size"])
    merged = w * vision["spatial_merge_size"] ** 2
    groups: list[dict[str, tuple[int, ...]]] = [{"visual.patch_embed.proj.weight": patch}]
    for block in range(vision["depth"]):
        p = f"visual.blocks.{block}"
        groups.append(
            {
                f"{p}.norm1.weight": (w,),
                f"{p}.norm2.weight": (w,),
                f"{p}.attn.qkv.weight": (3 * w, w),
                f"{p}.attn.qkv.bias": (3 * w,),
                f"{p}.attn.proj.weight": (w, w),
                f"{p}.attn.proj.bias": (w,),
                f"{p}.mlp.gate_proj.weight": (mlp, w),
                f"{p}.mlp.gate_proj.bias": (mlp,),
                f"{p}.mlp.up_proj.weight": (mlp, w),
                f"{p}.mlp.up_proj.bias": (mlp,),
                f"{p}.mlp.down_proj.weight": (w, mlp),
                f"{p}.mlp.down_proj.bias": (w,),
            }
        )
    groups.append(
        {
            "visual.merger.ln_q.weight": (w,),
            "visual.merger.mlp.0.weight": (merged, merged),
            "visual.merger.mlp.0.bias": (merged,),
            "visual.merger.mlp.2.weight": (out, merged),
            "visual.merger.mlp.2.bias": (out,),
        }
    )
    return groups


def decoder_groups(text: dict[str, Any]) -> list[dict[str, tuple[int, ...]]]:
    """The decoder's tensors (Qwen2 layers with q/k/v biases), as ``export_bench`` lays out a Qwen2 LLM."""
    h, v = text["hidden_size"], text["vocab_size"]
    case = {**text, "qkv_bias": True}
    groups = [{"model.embed_tokens.weight": (v, h)}]
    groups += [layer_tensors(case, layer) for layer in range(text["num_hidden_layers"])]
    tail = {"model.norm.weight": (h,)}
    if not text["tie_word_embeddings"]:
        tail["lm_head.weight"] = (v, h)
    groups.append(tail)
    return groups


def _pattern(name: str) -> str:
    """A tensor name with its layer / block index replaced, so 2 tiny blocks stand for 32 real ones."""
    return re.sub(r"\.(layers|blocks)\.\d+\.", r".\1.N.", name)


def check_names(tiny: Path, shapes: dict[str, tuple[int, ...]], *, keep_lm_head: bool = False) -> None:
    """Fail unless the big checkpoint's names (and ranks) are exactly the tiny demo checkpoint's.

    The tiny one is what transformers 5 itself saves for this architecture, so this keeps the bench
    honest if the library's demo (or transformers' layout) moves. Its ``lm_head`` is left out unless
    ``keep_lm_head``: the tiny config is untied, the real 3B one ties the head to the embedding.
    """
    with safe_open(str(tiny / "model.safetensors"), "pt") as f:
        names = [k for k in f.keys() if keep_lm_head or k != "lm_head.weight"]  # noqa: SIM118
        expected = {_pattern(k): len(f.get_slice(k).get_shape()) for k in names}
    actual = {_pattern(k): len(s) for k, s in shapes.items()}
    if expected != actual:
        missing, extra = sorted(set(expected) - set(actual)), sorted(set(actual) - set(expected))
        ranks = sorted(k for k in set(expected) & set(actual) if expected[k] != actual[k])
        raise SystemExit(
            f"tensor names differ from the tiny checkpoint {tiny}: missing {missing}, extra {extra}, rank {ranks}"
        )


def write_vlm_checkpoint(directory: Path, shard_bytes: int = 2 << 30) -> int:
    """Write the 3B-shaped VLM checkpoint shard by shard, with tokenizer, chat template and processor config."""
    groups = vision_groups(VISION_CONFIG) + decoder_groups(TEXT_CONFIG)
    with tempfile.TemporaryDirectory() as tmp:
        tiny = make_checkpoint(Path(tmp) / "tiny", family=FAMILY, dtype="bfloat16")
        check_names(tiny, {k: s for group in groups for k, s in group.items()})
        processor = json.loads((tiny / "preprocessor_config.json").read_text())
    total = write_shards(groups, directory, shard_bytes)
    (directory / "config.json").write_text(json.dumps(CONFIG, indent=2))
    processor.update(PROCESSOR_SIZES)
    (directory / "preprocessor_config.json").write_text(json.dumps(processor, indent=2) + "\n")
    tokenizer = train_tokenizer(FAMILY)
    tokenizer.chat_template = QWEN_VL_TEMPLATE
    tokenizer.save_pretrained(str(directory))
    return total


def run_vlm_bench(doc: str, *, module: str, name: str, write: Callable[[Path], int], targets: dict) -> int:
    """The main of a VLM export benchmark: generate the checkpoint in its own process (once), export the
    vision encoder then the LLM, each alone, record the runs in ``bench/results/<module>.json``."""
    parser = bench_parser(doc, keep="keep the checkpoint and the exports")
    parser.add_argument("--generate-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    checkpoint, onnx_root = args.workdir / f"{name}-checkpoint", args.workdir / f"{name}-onnx"
    if args.generate_only:
        log.info("%s: %.0fM parameters", checkpoint, write(checkpoint) / 1e6)
        return 0
    args.workdir.mkdir(parents=True, exist_ok=True)
    generated, generation = "reused", None
    if not (checkpoint / "config.json").is_file():
        generate = module_command(f"bench.{module}", "--workdir", str(args.workdir), "--generate-only")
        code, generation = measure_command(generate, stderr=None)
        if code != 0:
            raise SystemExit(f"checkpoint generation failed: {' '.join(generate)}")
        generated = f"{generation.wall_s:.1f} s, {generation.peak_rss_gb} GB peak RSS"
    rows = []
    for export in EXPORTS:
        output = onnx_root / export
        shutil.rmtree(output, ignore_errors=True)
        command = [sys.executable, "-m", EXPORTS[export], "--model_dir", str(checkpoint), "--output_dir", str(output)]
        rows.append((export, *run_export(export, command, output, args.workdir / f"{name}-{export}.log")))
    if not args.keep:
        shutil.rmtree(checkpoint, ignore_errors=True)
        shutil.rmtree(onnx_root, ignore_errors=True)
    print(f"checkpoint generation: {generated}")
    if not args.no_record:
        runs = [run_record("generate checkpoint", generation)] if generation else []
        runs += [
            run_record(export, measured, onnx_model_data_gb=round(data_gb, 2))
            for export, code, measured, data_gb in rows
            if code == 0
        ]
        record(module, runs, args.note)
    return print_export_table(rows, targets)


def main() -> int:
    return run_vlm_bench(
        __doc__, module="visual_export_bench", name=f"{FAMILY}-3b", write=write_vlm_checkpoint, targets=TARGETS
    )


if __name__ == "__main__":
    raise SystemExit(main())
