"""Time of a dry-run of ``all`` for 3 models x 4 precisions x 2 SM targets (run by hand; target < 3 s),
and of the source checks planning runs on an 8B-shaped checkpoint.

    .venv/bin/python -m bench.plan_bench [--repeat 5] [--note TEXT] [--no-record]

Run from the checkout's root. The first dry-run is reported apart from the median of the others:
it pays for cold caches (Python bytecode, the checkpoint's digests). Measured runs (with each run's
peak RSS, Snakemake's own ru_maxrss): bench/results/plan_bench.json (each run appends to it).

Planning opens every shard header of a source and checks the config against the weights' shapes
(:func:`~edgellm_steps.quant.checkpoint_record.open_checkpoint`). Its cost on a real size is measured
on a Llama-3.1-8B-shaped checkpoint of four shards whose headers are real and whose data are holes
(sparse files: 16 GB each to the checks, nothing on disk); the median of ``--repeat`` calls.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import statistics
import struct
import tempfile
import time
from pathlib import Path

from edgellm_steps.models.demo import make_checkpoint

from .common import BIN, REPO, bench_parser, record, run_measured, run_record

CONFIG = """\
defaults:
  precisions: [fp16, fp8, int8_sq, int4_awq]
  sm_targets: [89, 110]
models:
  model-a: {source: ckpt}
  model-b: {source: ckpt}
  model-c: {source: ckpt}
"""


#: Llama-3.1-8B's sizes.
LLAMA_8B = {
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "tie_word_embeddings": False,
    "vocab_size": 128256,
}


def _llama_8b_tensors() -> dict[str, list[int]]:
    h, i, kv, v = 4096, 14336, 1024, 128256
    shapes = {"model.embed_tokens.weight": [v, h], "model.norm.weight": [h], "lm_head.weight": [v, h]}
    for layer in range(32):
        p = f"model.layers.{layer}"
        shapes |= {f"{p}.input_layernorm.weight": [h], f"{p}.post_attention_layernorm.weight": [h]}
        shapes |= {f"{p}.self_attn.{n}.weight": s for n, s in (("q_proj", [h, h]), ("k_proj", [kv, h]))}
        shapes |= {f"{p}.self_attn.{n}.weight": s for n, s in (("v_proj", [kv, h]), ("o_proj", [h, h]))}
        shapes |= {f"{p}.mlp.{n}.weight": [i, h] for n in ("gate_proj", "up_proj")} | {
            f"{p}.mlp.down_proj.weight": [h, i]
        }
    return shapes


def make_sparse_8b(directory: Path) -> None:
    """An 8B-shaped bf16 checkpoint: a tiny llama's tokenizer, the 8B config, four shards of real headers over holes."""
    make_checkpoint(directory, family="llama")
    config = json.loads((directory / "config.json").read_text()) | LLAMA_8B
    (directory / "config.json").write_text(json.dumps(config))
    (directory / "model.safetensors").unlink()
    names = list(_llama_8b_tensors().items())
    weight_map = {}
    for shard in range(4):
        part = names[shard::4]
        name = f"model-{shard + 1:05d}-of-00004.safetensors"
        header, offset = {}, 0
        for tensor, shape in part:
            size = 2 * math.prod(shape)
            header[tensor] = {"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + size]}
            offset += size
            weight_map[tensor] = name
        text = json.dumps(header).encode()
        text += b" " * (-len(text) % 8)
        with open(directory / name, "wb") as handle:
            handle.write(struct.pack("<Q", len(text)) + text)
        os.truncate(directory / name, 8 + len(text) + offset)
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def time_source_checks(repeat: int) -> float:
    """Median seconds of open_checkpoint on the sparse 8B-shaped checkpoint."""
    from edgellm_steps.quant.checkpoint_record import open_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        make_sparse_8b(Path(tmp) / "ckpt")
        times = []
        for _ in range(repeat):
            started = time.perf_counter()
            open_checkpoint(Path(tmp) / "ckpt")
            times.append(time.perf_counter() - started)
        shutil.rmtree(tmp, ignore_errors=True)
    return statistics.median(times)


def main() -> int:
    parser = bench_parser(__doc__, workdir=False)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        make_checkpoint(work / "ckpt", family="qwen2", hidden_size=128, intermediate_size=256)
        (work / "config.yaml").write_text(CONFIG)
        command = [str(BIN / "snakemake"), "--snakefile", str(REPO / "Snakefile")]
        command += ["--directory", str(work), "--dry-run", "--quiet", "all"]
        runs = [run_measured(command) for _ in range(args.repeat + 1)]
    warm = [run.wall_s for run in runs[1:]]
    print(f"dry-run of all (46 jobs): first {runs[0].wall_s:.2f} s, then median {statistics.median(warm):.2f} s")
    checks = time_source_checks(args.repeat)
    print(f"source checks of an 8B-shaped checkpoint (4 shards, 291 tensors): median {checks * 1000:.0f} ms")
    if not args.no_record:
        details = {"jobs": 46, "target_s": 3}
        recorded = [run_record("dry-run of all, first", runs[0], **details)]
        recorded += [run_record("dry-run of all, repeated", run, **details) for run in runs[1:]]
        recorded.append(run_record("open_checkpoint of an 8B-shaped source, median", None, wall_s=round(checks, 4)))
        record("plan_bench", recorded, args.note)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
