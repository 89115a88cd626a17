"""Wall time and peak RSS of ``edgellm-export-llm`` on real model shapes (run by hand, not in CI).

Cases (random weights, the public configs' shapes):
  0.5b  Qwen2.5-0.5B-Instruct (494M parameters, tied embeddings, bf16). Targets: <= 26 s, <= 1.4 GB.
  8b    Llama-3.1-8B (8.0B parameters, 16 GB bf16), written shard by shard. Target: <= 4 GB peak RSS.

    .venv/bin/python -m bench.export_bench 0.5b [8b] [--workdir DIR] [--keep] [--note TEXT] [--no-record]

Run from the checkout's root. Peak RSS is the export process's ru_maxrss. Checkpoints are generated
in a separate process: a child forked from a large parent would inherit the parent's RSS in ru_maxrss.
Measured runs: bench/results/export_bench.json (each run appends to it).

The checkpoint writers here (CASES, write_checkpoint, write_shards, layer_tensors) are also the
base checkpoints of the LoRA, EAGLE and vision benchmarks.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import subprocess
from pathlib import Path

import torch
from safetensors.torch import save_file

from edgellm_steps.models.demo import train_tokenizer

from .common import BIN, Measurement, bench_parser, module_command, record, run_measured, run_record

log = logging.getLogger("export_bench")

CASES = {
    "0.5b": {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_size": 896,
        "intermediate_size": 4864,
        "num_hidden_layers": 24,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "vocab_size": 151936,
        "max_position_embeddings": 32768,
        "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-06,
        "tie_word_embeddings": True,
        "hidden_act": "silu",
        "qkv_bias": True,
        "targets": {"wall_s": 26, "peak_rss_gb": 1.4},
    },
    "8b": {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "max_position_embeddings": 131072,
        "rope_theta": 500000.0,
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        "rms_norm_eps": 1e-05,
        "tie_word_embeddings": False,
        "hidden_act": "silu",
        "qkv_bias": False,
        "targets": {"peak_rss_gb": 4.0},
    },
}


def layer_tensors(case: dict, layer: int) -> dict[str, tuple[int, ...]]:
    h, i = case["hidden_size"], case["intermediate_size"]
    d = h // case["num_attention_heads"]
    kv = case["num_key_value_heads"] * d
    p = f"model.layers.{layer}"
    shapes = {
        f"{p}.input_layernorm.weight": (h,),
        f"{p}.post_attention_layernorm.weight": (h,),
        f"{p}.self_attn.q_proj.weight": (h, h),
        f"{p}.self_attn.k_proj.weight": (kv, h),
        f"{p}.self_attn.v_proj.weight": (kv, h),
        f"{p}.self_attn.o_proj.weight": (h, h),
        f"{p}.mlp.gate_proj.weight": (i, h),
        f"{p}.mlp.up_proj.weight": (i, h),
        f"{p}.mlp.down_proj.weight": (h, i),
    }
    if case["qkv_bias"]:
        shapes.update(
            {
                f"{p}.self_attn.q_proj.bias": (h,),
                f"{p}.self_attn.k_proj.bias": (kv,),
                f"{p}.self_attn.v_proj.bias": (kv,),
            }
        )
    return shapes


def write_shards(groups: list[dict[str, tuple[int, ...]]], directory: Path, shard_bytes: int = 2 << 30) -> int:
    """Write random bf16 tensors of these shapes shard by shard, plus the index; only one shard is ever in memory.

    A group (e.g. one layer's tensors) is never split across shards. Returns the parameter count.
    """
    directory.mkdir(parents=True, exist_ok=True)
    shards, current, size = [], {}, 0
    for group in groups:
        group_bytes = sum(2 * torch.Size(s).numel() for s in group.values())
        if current and size + group_bytes > shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current.update(group)
        size += group_bytes
    shards.append(current)
    weight_map, total = {}, 0
    generator = torch.Generator().manual_seed(0)
    for n, shapes in enumerate(shards):
        name = f"model-{n + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {k: (torch.randn(s, generator=generator) * 0.02).to(torch.bfloat16) for k, s in shapes.items()}
        save_file(tensors, str(directory / name), metadata={"format": "pt"})
        total += sum(t.numel() for t in tensors.values())
        weight_map.update(dict.fromkeys(tensors, name))
        del tensors
        log.info("wrote %s", name)
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": 2 * total}, "weight_map": weight_map}, indent=2)
    )
    return total


def write_checkpoint(case: dict, directory: Path, shard_bytes: int = 2 << 30) -> int:
    """Write a random bf16 checkpoint shard by shard; only one shard is ever in memory."""
    h, v = case["hidden_size"], case["vocab_size"]
    groups = [{"model.embed_tokens.weight": (v, h)}]
    groups += [layer_tensors(case, layer) for layer in range(case["num_hidden_layers"])]
    tail = {"model.norm.weight": (h,)}
    if not case["tie_word_embeddings"]:
        tail["lm_head.weight"] = (v, h)
    groups.append(tail)
    total = write_shards(groups, directory, shard_bytes)
    config = {k: v for k, v in case.items() if k not in ("targets", "qkv_bias")}
    config.update({"dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2})
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    train_tokenizer("qwen2" if case["model_type"] == "qwen2" else "llama").save_pretrained(str(directory))
    return total


def measure_export(checkpoint: Path, output: Path) -> Measurement:
    return run_measured([str(BIN / "edgellm-export-llm"), "--model_dir", str(checkpoint), "--output_dir", str(output)])


def main() -> int:
    parser = bench_parser(__doc__, keep="keep checkpoints and exports")
    parser.add_argument("cases", nargs="+", choices=sorted(CASES))
    parser.add_argument("--generate-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.generate_only:
        for name in args.cases:
            params = write_checkpoint(CASES[name], args.workdir / f"{name}-checkpoint")
            log.info("%s: %.0fM parameters", name, params / 1e6)
        return 0
    rows = []
    for name in args.cases:
        case = CASES[name]
        checkpoint, output = args.workdir / f"{name}-checkpoint", args.workdir / f"{name}-onnx"
        shutil.rmtree(output, ignore_errors=True)
        if not (checkpoint / "config.json").is_file():
            generate = module_command("bench.export_bench", name, "--workdir", str(args.workdir), "--generate-only")
            subprocess.run(generate, check=True)
        result = measure_export(checkpoint, output)
        data_gb = (output / "onnx_model.data").stat().st_size / 1e9
        rows.append((name, result, case["targets"], data_gb))
        if not args.keep:
            shutil.rmtree(checkpoint, ignore_errors=True)
            shutil.rmtree(output, ignore_errors=True)
    print("| case | wall (s) | peak RSS (GB) | onnx_model.data (GB) | targets |")
    print("|---|---|---|---|---|")
    for name, measured, targets, data_gb in rows:
        goal = ", ".join(f"{k} <= {v}" for k, v in targets.items())
        print(f"| {name} | {measured.wall_s:.1f} | {measured.peak_rss_gb} | {data_gb:.2f} | {goal} |")
    if not args.no_record:
        runs = [
            run_record(name, measured, step="export-llm", onnx_model_data_gb=round(data_gb, 2))
            for name, measured, _, data_gb in rows
        ]
        record("export_bench", runs, args.note)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
