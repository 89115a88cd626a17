"""Wall time and peak RSS of ``edgellm-merge-lora`` on a Llama-3.1-8B-shaped checkpoint (run by hand).

The case is ``bench.lora_bench``'s: the ``8b`` checkpoint of ``bench.export_bench`` (random bf16 weights,
16 GB in 2 GB shards) and a rank-16 adapter on all seven projections of every layer, written directly in
PEFT's layout. merge-lora runs alone in its own process and streams the checkpoint, so its peak RSS is what
``MERGE_PEAK`` of ``edgellm_steps/workflow/resources.py`` (the job's mem_mb) comes from; ``cp`` of the same
shards (page cache as the merge left it) is printed beside it as the disk's own time.

    .venv/bin/python -m bench.merge_lora_bench [--workdir DIR] [--layers N] [--lm-head] [--keep] [--note TEXT]
                                               [--no-record]

``--lm-head`` adds a rank-16 LoRA on the LM head (128256 x 4096, the widest weight a merge can adapt).

Run from the checkout's root. Measured runs: bench/results/merge_lora_bench.json (each run appends to it).
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from edgellm_steps.artifacts.checkpoint import weight_files

from .common import bench_parser, module_command, record, run_record
from .lora_bench import BASE_CASE, RANK, measure

log = logging.getLogger("merge_lora_bench")


def with_lm_head(adapter: Path, directory: Path) -> Path:
    """A copy of ``adapter`` that adapts the LM head too (rank :data:`RANK`, bf16, PEFT's key layout)."""
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    generator = torch.Generator().manual_seed(1)
    hidden, vocab = BASE_CASE["hidden_size"], BASE_CASE["vocab_size"]
    tensors["base_model.model.lm_head.lora_A.weight"] = (
        torch.randn(RANK, hidden, generator=generator) * 0.01
    ).bfloat16()
    tensors["base_model.model.lm_head.lora_B.weight"] = (
        torch.randn(vocab, RANK, generator=generator) * 0.01
    ).bfloat16()
    save_file(tensors, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["target_modules"] = [*config["target_modules"], "lm_head"]
    (directory / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return directory


def main() -> int:
    parser = bench_parser(__doc__, keep="keep the checkpoint, the adapter and the merged checkpoint")
    parser.add_argument("--layers", type=int, default=BASE_CASE["num_hidden_layers"], help="decoder layers (32)")
    parser.add_argument("--lm-head", action="store_true", help="the adapter adapts the LM head too")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    full = args.layers == BASE_CASE["num_hidden_layers"]
    base = args.workdir / ("8b-checkpoint" if full else f"8b-{args.layers}l-checkpoint")
    adapter = args.workdir / f"8b-{args.layers}l-adapter"
    merged, copied = args.workdir / "8b-merged", args.workdir / "8b-copied"
    args.workdir.mkdir(parents=True, exist_ok=True)
    if not (base / "config.json").is_file() or not (adapter / "adapter_config.json").is_file():
        generate = module_command("bench.lora_bench", "--workdir", str(args.workdir), "--layers", str(args.layers))
        subprocess.run([*generate, "--generate-only"], check=True)
    if args.lm_head:
        adapter = with_lm_head(adapter, args.workdir / f"8b-{args.layers}l-adapter-lm_head")
    shutil.rmtree(merged, ignore_errors=True)
    command = [sys.executable, "-m", "edgellm_steps.cli.merge_lora", "--model_dir", str(base)]
    command += ["--adapter_dir", str(adapter), "--output_dir", str(merged)]
    code, measured = measure("merge-lora", command, args.workdir / "merge-lora.log")
    if code != 0:
        return 1
    weight_bytes = sum(p.stat().st_size for p in weight_files(merged))
    shutil.rmtree(merged, ignore_errors=True)  # the disk holds two copies of the shards, not three
    copied.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    subprocess.run(["cp", *map(str, weight_files(base)), str(copied)], check=True)
    subprocess.run(["sync"], check=True)
    cp_s = time.perf_counter() - start
    shutil.rmtree(copied, ignore_errors=True)
    print(
        f"{args.layers} layers, rank {RANK}{' with the LM head' * args.lm_head}, {weight_bytes / 1e9:.1f} GB of weights"
    )
    print("| step | wall (s) | peak RSS (GB) | cp of the shards (s) |")
    print("|---|---|---|---|")
    print(f"| merge-lora | {measured.wall_s:.1f} | {measured.peak_rss_gb} | {cp_s:.1f} |")
    if not args.no_record:
        details = {"layers": args.layers, "rank": RANK, "lm_head": args.lm_head, "weight_bytes": weight_bytes}
        details |= {"adapter_bytes": (adapter / "adapter_model.safetensors").stat().st_size, "cp_s": round(cp_s, 1)}
        case = f"merge-lora ({args.layers} layers{', lm_head' * args.lm_head})"
        record("merge_lora_bench", [run_record(case, measured, **details)], args.note)
    if not args.keep:
        for path in {base, adapter, args.workdir / f"8b-{args.layers}l-adapter"}:
            shutil.rmtree(path, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
