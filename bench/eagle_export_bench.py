"""Wall time and peak RSS of exporting a Llama-3.1-8B-shaped EAGLE3 base and its draft (run by hand).

The case: ``bench.export_bench``'s ``8b`` Llama-3.1-8B checkpoint (random bf16 weights, 8.0B parameters,
16 GB in 2 GB shards, a locally trained tokenizer) and a draft shaped like the public
yuhuili/EAGLE3-LLaMA3.1-Instruct-8B: ``LlamaForCausalLMEagle3``, one ``midlayer`` whose q/k/v read
2 x 4096 inputs, ``fc`` [4096, 12288], ``lm_head`` over a 32000-token draft vocabulary, ``d2t`` (int64)
and ``t2d`` (bool); 426M parameters, 0.85 GB in one ``model.safetensors``, no tokenizer.
Each export runs alone in its own process, one after the other:

    python -m edgellm_steps.cli.export_llm --model_dir BASE --output_dir OUT/eagle_base --is_eagle_base
    python -m edgellm_steps.cli.export_draft --draft_model_dir DRAFT --base_model_dir BASE --output_dir OUT/draft
    python -m edgellm_steps.cli.export_llm --model_dir BASE --output_dir OUT/plain     (only with --with-plain)

    .venv/bin/python -m bench.eagle_export_bench [--workdir DIR] [--keep] [--layers N] [--with-plain] [--note TEXT]

Run from the checkout's root. ``--layers N`` gives the base N decoder layers instead of 32 (a quick
smoke run); the draft is always full size. ``--with-plain`` also exports the base without
``--is_eagle_base``, for comparison (16 GB more disk). ``--no-record`` leaves the results file alone.

Measured runs (generation, eagle_base, draft, plain, with their conditions):
bench/results/eagle_export_bench.json (each run appends to it).
Targets: eagle_base and plain <= 120 s and <= 3 GB; draft <= 15 s and <= 1.5 GB. The exports stream
weights, so peak RSS must stay far below the 16 GB base and the 0.85 GB draft they write.

Peak RSS is each export process's own ru_maxrss (``os.wait4``); the checkpoints are generated in a
separate process, as in ``bench.export_bench``, so no export inherits the generator's memory.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from .common import bench_parser, measure_command, module_command, print_export_table, record, run_export, run_record
from .export_bench import CASES, write_checkpoint

log = logging.getLogger("eagle_export_bench")

BASE_CASE = CASES["8b"]
DRAFT_VOCAB = 32000
#: yuhuili/EAGLE3-LLaMA3.1-Instruct-8B's config, with the base's rope and a bf16 dtype.
DRAFT_CONFIG: dict[str, Any] = {
    "architectures": ["LlamaForCausalLMEagle3"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "num_hidden_layers": 1,
    "vocab_size": BASE_CASE["vocab_size"],
    "draft_vocab_size": DRAFT_VOCAB,
    "target_hidden_size": BASE_CASE["hidden_size"],
    "hidden_act": "silu",
    "rms_norm_eps": 1e-05,
    "rope_theta": BASE_CASE["rope_theta"],
    "rope_scaling": BASE_CASE.get("rope_scaling"),
    "max_position_embeddings": BASE_CASE["max_position_embeddings"],
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}
#: Reference limits per export at full size (see the module docstring).
TARGETS = {
    "eagle_base": {"wall_s": 120, "peak_rss_gb": 3},
    "draft": {"wall_s": 15, "peak_rss_gb": 1.5},
    "plain": {"wall_s": 120, "peak_rss_gb": 3},
}


def base_case(layers: int) -> dict[str, Any]:
    return {**BASE_CASE, "num_hidden_layers": layers}


def draft_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """The draft's weight shapes in the published layout (``make_eagle3_draft``'s names)."""
    h, i = config["hidden_size"], config["intermediate_size"]
    d = h // config["num_attention_heads"]
    q, kv, target = config["num_attention_heads"] * d, config["num_key_value_heads"] * d, config["target_hidden_size"]
    return {
        "fc.weight": (h, 3 * target),
        "midlayer.input_layernorm.weight": (h,),
        "midlayer.hidden_norm.weight": (h,),
        "midlayer.post_attention_layernorm.weight": (h,),
        "midlayer.self_attn.q_proj.weight": (q, 2 * h),
        "midlayer.self_attn.k_proj.weight": (kv, 2 * h),
        "midlayer.self_attn.v_proj.weight": (kv, 2 * h),
        "midlayer.self_attn.o_proj.weight": (h, q),
        "midlayer.mlp.gate_proj.weight": (i, h),
        "midlayer.mlp.up_proj.weight": (i, h),
        "midlayer.mlp.down_proj.weight": (h, i),
        "norm.weight": (h,),
        "lm_head.weight": (config["draft_vocab_size"], h),
    }


def write_draft(directory: Path, config: dict[str, Any] = DRAFT_CONFIG) -> int:
    """Write the random bf16 EAGLE3 draft: one ``model.safetensors`` and ``config.json``; no tokenizer."""
    directory.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(1)
    tensors = {}
    for name, shape in draft_shapes(config).items():
        if name.endswith("norm.weight"):
            tensors[name] = (1 + 0.1 * torch.randn(shape, generator=generator)).to(torch.bfloat16)
        else:
            tensors[name] = (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)
    total = sum(t.numel() for t in tensors.values())
    draft_vocab, vocab = config["draft_vocab_size"], config["vocab_size"]
    # Draft id i is base id 3 i: valid, increasing base ids spread over the base vocabulary.
    base_ids = 3 * torch.arange(draft_vocab, dtype=torch.int64)
    if base_ids[-1] >= vocab:
        raise SystemExit(f"a draft vocabulary of {draft_vocab} does not fit 3 i < {vocab}")
    tensors["d2t"] = base_ids - torch.arange(draft_vocab, dtype=torch.int64)
    t2d = torch.zeros(vocab, dtype=torch.bool)
    t2d[base_ids] = True
    tensors["t2d"] = t2d
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return total


def main() -> int:
    parser = bench_parser(__doc__, keep="keep the checkpoints and the exports")
    parser.add_argument(
        "--layers", type=int, default=BASE_CASE["num_hidden_layers"], help="the base's decoder layers (default: 32)"
    )
    parser.add_argument("--with-plain", action="store_true", help="also export the base without --is_eagle_base")
    parser.add_argument("--generate-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    full = args.layers == BASE_CASE["num_hidden_layers"]
    # At full size the base is bench.export_bench's 8b checkpoint, so one kept with --keep is reused.
    base = args.workdir / ("8b-checkpoint" if full else f"8b-{args.layers}l-checkpoint")
    draft = args.workdir / "eagle3-8b-draft"
    if args.generate_only:
        params = write_checkpoint(base_case(args.layers), base)
        log.info("%s: %.0fM parameters", base, params / 1e6)
        params = write_draft(draft)
        log.info("%s: %.0fM parameters", draft, params / 1e6)
        return 0
    args.workdir.mkdir(parents=True, exist_ok=True)
    generated, generation = "reused", None
    if not (base / "config.json").is_file() or not (draft / "config.json").is_file():
        generate = module_command(
            "bench.eagle_export_bench", "--workdir", str(args.workdir), "--layers", str(args.layers)
        )
        code, generation = measure_command([*generate, "--generate-only"], stderr=None)
        if code != 0:
            raise SystemExit(f"checkpoint generation failed: {' '.join(generate)} --generate-only")
        generated = f"{generation.wall_s:.1f} s, {generation.peak_rss_gb} GB peak RSS"
    out = args.workdir / "eagle3-8b-onnx"
    llm = [sys.executable, "-m", "edgellm_steps.cli.export_llm", "--model_dir", str(base), "--output_dir"]
    commands = {
        "eagle_base": [*llm, str(out / "eagle_base"), "--is_eagle_base"],
        "draft": [
            sys.executable,
            "-m",
            "edgellm_steps.cli.export_draft",
            "--draft_model_dir",
            str(draft),
            "--base_model_dir",
            str(base),
            "--output_dir",
            str(out / "draft"),
        ],
    }
    if args.with_plain:
        commands["plain"] = [*llm, str(out / "plain")]
    rows = []
    for name, command in commands.items():
        output = out / name
        shutil.rmtree(output, ignore_errors=True)
        rows.append((name, *run_export(name, command, output, args.workdir / f"eagle3-8b-{name}.log")))
    if not args.keep:
        shutil.rmtree(base, ignore_errors=True)
        shutil.rmtree(draft, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)
    print(f"base: {args.layers} layers; checkpoint generation: {generated}")
    if not args.no_record:
        runs = [run_record("generate base and draft", generation, layers=args.layers)] if generation else []
        runs += [
            run_record(name, measured, layers=args.layers, onnx_model_data_gb=round(data_gb, 2))
            for name, code, measured, data_gb in rows
            if code == 0
        ]
        record("eagle_export_bench", runs, args.note)
    return print_export_table(rows, TARGETS, "targets (32 layers)")


if __name__ == "__main__":
    raise SystemExit(main())
