"""Wall time and peak RSS of insert-lora and process-lora on a Llama-3.1-8B-shaped export (run by hand).

The case: ``bench.export_bench``'s ``8b`` checkpoint (random bf16 weights, 8.0B parameters, 16 GB),
exported once with export-llm, and a PEFT-layout adapter for it (rank 16 on all seven projections
of the 32 layers, 42M parameters, bf16, written directly in PEFT's key layout: loading the 8B model
into PEFT would need 32 GB). Each step runs alone in its own process:

    python -m edgellm_steps.cli.export_llm --model_dir BASE --output_dir OUT/llm
    python -m edgellm_steps.cli.insert_lora --onnx_dir OUT/llm            (onnx_model.data moved away)
    python -m edgellm_steps.cli.process_lora --input_dir ADAPTER --output_dir OUT/lora --model_dir BASE

    .venv/bin/python -m bench.lora_bench [--workdir DIR] [--keep] [--layers N] [--note TEXT] [--no-record]

Run from the checkout's root. insert-lora runs with the export's 15 GB ``onnx_model.data`` renamed
away, so it cannot read the weights: it succeeds only if it reads nothing but ``model.onnx``.

Measured runs (the export, insert-lora and process-lora, with their conditions):
bench/results/lora_bench.json (each run appends to it).
Targets: insert-lora <= 5 s and <= 0.5 GB (it reads one small protobuf); process-lora <= 10 s and <= 1 GB.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from .common import Measurement, bench_parser, measure_command, module_command, record, run_export, run_record
from .export_bench import CASES, write_checkpoint

log = logging.getLogger("lora_bench")

BASE_CASE = CASES["8b"]
RANK = 16
TARGETS = {
    "insert-lora": {"wall_s": 5, "peak_rss_gb": 0.5},
    "process-lora": {"wall_s": 10, "peak_rss_gb": 1},
}


def adapter_shapes(case: dict, layers: int) -> dict[str, tuple[int, int]]:
    """PEFT module key (``base_model.model.`` stripped) -> (in, out) of every projection."""
    h, inter = case["hidden_size"], case["intermediate_size"]
    head = h // case["num_attention_heads"]
    q, kv = case["num_attention_heads"] * head, case["num_key_value_heads"] * head
    per_layer = {
        "self_attn.q_proj": (h, q),
        "self_attn.k_proj": (h, kv),
        "self_attn.v_proj": (h, kv),
        "self_attn.o_proj": (q, h),
        "mlp.gate_proj": (h, inter),
        "mlp.up_proj": (h, inter),
        "mlp.down_proj": (inter, h),
    }
    return {f"model.layers.{i}.{name}": shape for i in range(layers) for name, shape in per_layer.items()}


def write_adapter(directory: Path, case: dict, layers: int) -> int:
    """A rank-16 adapter in PEFT's saved layout; returns its parameter count."""
    directory.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    tensors = {}
    for module, (fan_in, fan_out) in adapter_shapes(case, layers).items():
        key = f"base_model.model.{module}"
        tensors[f"{key}.lora_A.weight"] = (torch.randn(RANK, fan_in, generator=generator) * 0.01).bfloat16()
        tensors[f"{key}.lora_B.weight"] = (torch.randn(fan_out, RANK, generator=generator) * 0.01).bfloat16()
    save_file(tensors, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA",
        "r": RANK,
        "lora_alpha": 32,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "bias": "none",
        "use_dora": False,
        "use_rslora": False,
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": "bench/8b",
    }
    (directory / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return sum(t.numel() for t in tensors.values())


def measure(name: str, command: list[str], log_path: Path) -> tuple[int, Measurement]:
    log.info("%s: %s (log %s)", name, " ".join(command), log_path)
    with log_path.open("w") as stderr:
        code, measured = measure_command(command, stderr=stderr)
    if code != 0:
        log.error("%s failed (exit %d); end of %s:\n%s", name, code, log_path, log_path.read_text()[-3000:])
    else:
        log.info("%s: %.1f s, %s GB peak RSS", name, measured.wall_s, measured.peak_rss_gb)
    return code, measured


def main() -> int:
    parser = bench_parser(__doc__, keep="keep the checkpoint, the export and the adapter")
    parser.add_argument("--layers", type=int, default=BASE_CASE["num_hidden_layers"], help="decoder layers (32)")
    parser.add_argument("--generate-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    case = {**BASE_CASE, "num_hidden_layers": args.layers}
    full = args.layers == BASE_CASE["num_hidden_layers"]
    base = args.workdir / ("8b-checkpoint" if full else f"8b-{args.layers}l-checkpoint")
    adapter = args.workdir / f"8b-{args.layers}l-adapter"
    if args.generate_only:
        log.info("%s: %.0fM parameters", base, write_checkpoint(case, base) / 1e6)
        log.info("%s: %.0fM parameters", adapter, write_adapter(adapter, case, args.layers) / 1e6)
        return 0
    args.workdir.mkdir(parents=True, exist_ok=True)
    if not (base / "config.json").is_file() or not (adapter / "adapter_config.json").is_file():
        generate = module_command("bench.lora_bench", "--workdir", str(args.workdir), "--layers", str(args.layers))
        if measure_command([*generate, "--generate-only"], stderr=None)[0] != 0:
            raise SystemExit("checkpoint generation failed")
    out = args.workdir / "8b-lora-onnx"
    shutil.rmtree(out, ignore_errors=True)
    export = [sys.executable, "-m", "edgellm_steps.cli.export_llm", "--model_dir", str(base), "--output_dir"]
    code, exported, _ = run_export(
        "export-llm", [*export, str(out / "llm")], out / "llm", args.workdir / "lora-export.log"
    )
    if code != 0:
        return 1
    data, aside = out / "llm/onnx_model.data", args.workdir / "weights-aside.data"
    data.rename(aside)
    try:
        insert = [sys.executable, "-m", "edgellm_steps.cli.insert_lora", "--onnx_dir", str(out / "llm")]
        rows = [("insert-lora", *measure("insert-lora", insert, args.workdir / "insert-lora.log"))]
    finally:
        aside.rename(data)
    process = [sys.executable, "-m", "edgellm_steps.cli.process_lora", "--input_dir", str(adapter)]
    process += ["--output_dir", str(out / "lora"), "--model_dir", str(base)]
    rows.append(("process-lora", *measure("process-lora", process, args.workdir / "process-lora.log")))
    if not args.keep:
        for path in (base, adapter, out):
            shutil.rmtree(path, ignore_errors=True)
    print(f"{args.layers} layers; export-llm {exported.wall_s:.1f} s, {exported.peak_rss_gb} GB peak RSS")
    print("| step | wall (s) | peak RSS (GB) | targets (32 layers) |")
    print("|---|---|---|---|")
    for name, code, measured in rows:
        goal = ", ".join(f"{k} <= {v}" for k, v in TARGETS[name].items())
        status = "" if code == 0 else f" (failed, exit {code})"
        print(f"| {name}{status} | {measured.wall_s:.1f} | {measured.peak_rss_gb} | {goal} |")
    if not args.no_record:
        runs = [run_record(f"export-llm ({args.layers} layers)", exported, step="export-llm", layers=args.layers)]
        runs += [
            run_record(f"{name} ({args.layers} layers)", measured, step=name, layers=args.layers, rank=RANK)
            for name, code, measured in rows
            if code == 0
        ]
        record("lora_bench", runs, args.note)
    return 0 if all(code == 0 for _, code, _ in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
