"""Resources of quantize and verify jobs: the measured memory model, and what a dry run requests."""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import pytest

from edgellm_steps.quant.formats import FORMATS
from edgellm_steps.workflow import resources
from edgellm_steps.workflow.config import validate_config
from edgellm_steps.workflow.planning import Planner
from edgellm_steps.workflow.resources import FLOOR_MB, MARGIN, MIB, PEAKS, quantize_mem_mb, verify_mem_mb

from .support import copy_checkpoint, run_snakemake, scenario, write_config

#: The bench checkpoint (Qwen2.5-0.5B shape): weight bytes, vocabulary, calibration tokens.
QWEN_05B = {"weight_bytes": 988_097_824, "vocab_size": 151_936, "tokens": 512}


def awq_0_5b(batch: int) -> int:
    return quantize_mem_mb(
        QWEN_05B["weight_bytes"],
        "int4_awq",
        batch=batch,
        tokens=QWEN_05B["tokens"],
        vocab_size=QWEN_05B["vocab_size"],
    )


def test_awq_request_grows_with_the_calibration_batch():
    requests = [awq_0_5b(batch) for batch in (1, 2, 4, 8, 16, 32)]
    assert requests == sorted(set(requests)), requests
    # The batch term is the calibration logits: 15 more samples of 512 tokens x 151936 floats.
    assert awq_0_5b(16) - awq_0_5b(1) >= 15 * 512 * 151_936 * 4 / MIB


def test_every_quantized_weight_format_has_a_row():
    from edgellm_steps.quant.precision import WEIGHT_PRECISIONS

    # int4_gptq is exported directly (no quantize job); fp16 has one only with an LM-head or KV override.
    assert set(PEAKS) == {*WEIGHT_PRECISIONS} - {"int4_gptq"} | {"verify"}


def test_small_jobs_request_the_floor():
    assert quantize_mem_mb(10_000_000, "fp8", batch=1, tokens=512, vocab_size=32_000) == FLOOR_MB
    assert quantize_mem_mb(10_000_000, "int4_awq", batch=16, tokens=512, vocab_size=32_000) == FLOOR_MB
    assert verify_mem_mb(10_000_000) == FLOOR_MB
    assert resources.request_mb(0) == FLOOR_MB


def test_requests_are_the_modelled_peak_with_the_margin():
    weight_bytes = 16 * 10**9  # an 8B bf16 checkpoint: far above the floor
    fp8 = PEAKS["fp8"]
    peak = fp8.factor * weight_bytes + fp8.logit_bytes * 1 * 512 * 128_256
    assert quantize_mem_mb(weight_bytes, "fp8", batch=1, tokens=512, vocab_size=128_256) == math.ceil(
        MARGIN * peak / MIB
    )
    assert verify_mem_mb(weight_bytes) == math.ceil(MARGIN * PEAKS["verify"].factor * weight_bytes / MIB)


def test_int4_awq_requests_more_than_fp8():
    shape = {"tokens": 512, "vocab_size": QWEN_05B["vocab_size"]}
    fp8 = quantize_mem_mb(QWEN_05B["weight_bytes"], "fp8", batch=1, **shape)
    assert awq_0_5b(16) > 2 * fp8  # at the recipes' batches (1 and 16)
    assert awq_0_5b(1) > fp8  # and at the same batch: AWQ's search holds more than max calibration
    big = 16 * 10**9
    assert quantize_mem_mb(big, "int4_awq", batch=1, **shape) > quantize_mem_mb(big, "fp8", batch=1, **shape)


def test_the_cited_bench_runs_are_all_there():
    """The runs the model is fitted to come from bench/results: every peak model has some (none vanished)."""
    runs = resources.measured_runs()
    assert len(runs) == 14 and {run.kind for run in runs} == set(PEAKS)


@pytest.mark.parametrize("measured", resources.measured_runs(), ids=lambda m: f"{m.kind}-b{m.batch}-s{m.samples}")
def test_requests_cover_every_measured_peak_with_the_margin_and_not_much_more(measured):
    """The 0.5B bench runs (bench/quantize_bench.py): each request is 1.25x to 2.5x its measured peak.

    (2.5x: int4_awq at batch 4 peaks below batch 1, and the model is linear in the batch.)
    """
    if measured.kind == "verify":
        request = verify_mem_mb(QWEN_05B["weight_bytes"])
    else:
        request = quantize_mem_mb(
            QWEN_05B["weight_bytes"],
            measured.kind,
            batch=measured.batch,
            tokens=QWEN_05B["tokens"],
            vocab_size=QWEN_05B["vocab_size"],
        )
    assert MARGIN * measured.peak_mib <= request + 1 <= 2.5 * measured.peak_mib


def layer_bytes(config: dict) -> int:
    """One decoder layer's weights in float32, from the config (q, k, v, o and the three MLP matrices)."""
    hidden, heads, kv = config["hidden_size"], config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    return 4 * (head_dim * (2 * heads + 2 * kv) * hidden + 3 * hidden * config["intermediate_size"])


QWEN_05B_SHAPE = {"hidden_size": 896, "num_attention_heads": 14, "num_key_value_heads": 2, "intermediate_size": 4864}
LLAMA_8B_SHAPE = {"hidden_size": 4096, "num_attention_heads": 32, "num_key_value_heads": 8, "intermediate_size": 14336}
#: (kind, shape, vocab, calibration tokens, measured peak MiB): the runs ``LAYERWISE_PEAKS`` cites.
LAYERWISE_RUNS = [
    ("calibrate", QWEN_05B_SHAPE, 151_936, 16 * 128, 953),
    ("calibrate", QWEN_05B_SHAPE, 151_936, 64 * 256, 1426),
    ("calibrate", QWEN_05B_SHAPE, 151_936, 256 * 512, 1780),
    ("calibrate", LLAMA_8B_SHAPE, 128_256, 16 * 128, 1626),
    ("from statistics", QWEN_05B_SHAPE, 151_936, 0, 1924),
    ("from statistics", LLAMA_8B_SHAPE, 128_256, 0, 3789),
    ("on the text", QWEN_05B_SHAPE, 151_936, 64 * 256, 2310),  # int4_awq, batch 16
    ("on the text", QWEN_05B_SHAPE, 151_936, 64 * 256, 2033),  # fp8
    ("on the text", LLAMA_8B_SHAPE, 128_256, 16 * 128, 3564),  # fp8
    ("on the text", LLAMA_8B_SHAPE, 128_256, 16 * 128, 3711),  # int4_awq, batch 16
]


@pytest.mark.parametrize(("kind", "shape", "vocab", "tokens", "peak_mib"), LAYERWISE_RUNS)
def test_layerwise_requests_cover_every_measured_peak_with_the_margin(kind, shape, vocab, tokens, peak_mib):
    hidden = shape["hidden_size"]
    request = resources.layerwise_mem_mb(
        kind,
        layer_bytes=layer_bytes(shape),
        state_bytes=4 * tokens * hidden,
        table_bytes=4 * vocab * hidden,
    )
    assert MARGIN * peak_mib <= request <= max(FLOOR_MB, 2 * MARGIN * peak_mib)


def test_an_8b_shared_calibration_asks_for_a_fraction_of_the_whole_model_fit():
    """8B shape at the default calibration (512 samples of 512 tokens): the whole-model fit asked 3.3x the
    checkpoint (53 GB); the pass holds one layer and the states, the quantize jobs a layer and the table."""
    sizes = {"layer_bytes": layer_bytes(LLAMA_8B_SHAPE), "table_bytes": 4 * 128_256 * 4096}
    calibrate = resources.layerwise_mem_mb("calibrate", state_bytes=4 * 512 * 512 * 4096, **sizes)
    from_statistics = resources.layerwise_mem_mb("from statistics", state_bytes=0, **sizes)
    whole = quantize_mem_mb(16 * 10**9, "fp8", batch=1, tokens=512, vocab_size=128_256)
    assert from_statistics < calibrate < whole / 4


#: (widest adapted weight in float32, adapter bytes, measured peak MiB): bench/merge_lora_bench.py runs, Llama-3.1-8B
#: shape (gate_proj 14336 x 4096, the LM head 128256 x 4096), 32 and 2 layers.
MERGE_RUNS = [
    (4 * 14336 * 4096, 83_946_192, 733),
    (4 * 128_256 * 4096, 88_181_720, 2437),
    (4 * 14336 * 4096, 5_246_600, 641),
    (4 * 128_256 * 4096, 9_482_088, 2361),
]


@pytest.mark.parametrize(("widest", "adapter", "peak_mib"), MERGE_RUNS)
def test_merge_requests_cover_every_measured_peak_with_the_margin(widest, adapter, peak_mib):
    request = resources.merge_lora_mem_mb(widest_weight_bytes=widest, adapter_bytes=adapter)
    assert MARGIN * peak_mib <= request <= max(FLOOR_MB, 2 * MARGIN * peak_mib)


def test_merge_asks_for_a_fraction_of_what_it_asked_when_it_loaded_the_model():
    """An 8B merge used to ask the verify fit (the model in float32 with PEFT): 8.9 x 16 GB."""
    widest = resources.merge_lora_mem_mb(widest_weight_bytes=4 * 128_256 * 4096, adapter_bytes=88_181_720)
    assert widest < verify_mem_mb(16 * 10**9) / 30


#: (shape, layers, vocab, samples, tokens, precisions compared, measured peak MiB): bench/accuracy_bench.py runs.
TINY_SHAPE = {"hidden_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 256}
ACCURACY_RUNS = [
    (TINY_SHAPE, 2, 384, 8, 128, 4, 447),  # the trained tiny Qwen2, fp16 and four precisions
    (LLAMA_8B_SHAPE, 32, 128_256, 1, 2048, 0, 2688),  # fp16 alone
]


@pytest.mark.parametrize(("shape", "layers", "vocab", "samples", "tokens", "compared", "peak_mib"), ACCURACY_RUNS)
def test_accuracy_requests_cover_every_measured_peak_with_the_margin(
    shape, layers, vocab, samples, tokens, compared, peak_mib
):
    hidden, heads, kv = shape["hidden_size"], shape["num_attention_heads"], shape["num_key_value_heads"]
    request = resources.accuracy_mem_mb(
        segment_bytes=max(layer_bytes(shape) // 2, 2 * vocab * hidden),
        vocab_size=vocab,
        samples=samples,
        tokens=tokens,
        compared=compared,
        cache_bytes=2 * layers * 2 * kv * (hidden // heads) * tokens,
        hidden_bytes=2 * samples * 64 * layers * hidden,
    )
    assert MARGIN * peak_mib <= request <= max(FLOOR_MB, 2 * MARGIN * peak_mib)


def test_the_accuracy_request_reads_the_reports_chunk():
    from edgellm_steps.verify import accuracy

    assert resources.ACCURACY_CHUNK_TOKENS == accuracy.CHUNK_TOKENS
    assert resources.ACCURACY_LAYER_ROWS == accuracy.LAYER_ROWS


# Planner: what the rules ask for one model.


def planner(source: Path, **settings) -> Planner:
    config = {"models": {"m": {"source": str(source), **settings}}}
    validate_config(config)
    return Planner(config, state_dir=source.parent / "state")


def test_quantize_jobs_ask_for_one_layer_with_the_states_or_the_table(checkpoint_factory, tmp_path):
    """A quantize job holds one decoder layer: from the statistics with the embedding table, on the text (AWQ) also
    with the cached states, so its request grows with the calibration tokens and not with the batch."""
    ckpt = checkpoint_factory("qwen2", hidden_size=128, intermediate_size=256)
    config = json.loads((ckpt / "config.json").read_text())
    tokens = 10**5  # far above the floor, so that the states show

    def expected(kind: str, samples: int) -> int:
        return resources.layerwise_mem_mb(
            kind,
            layer_bytes=layer_bytes(config),
            state_bytes=4 * samples * tokens * config["hidden_size"],
            table_bytes=4 * config["vocab_size"] * config["hidden_size"],
        )

    default = planner(ckpt, quantization={"calib_max_tokens": tokens})
    assert default.resources.quantize_mem_mb("m", "int4_awq") == expected("on the text", 512) > FLOOR_MB
    assert default.resources.quantize_mem_mb("m", "fp8-kvfp8") == expected("from statistics", 512) == FLOOR_MB
    few = planner(ckpt, quantization={"calib_max_tokens": tokens, "calib_size": 4})
    assert few.resources.quantize_mem_mb("m", "int4_awq") == expected("on the text", 4)
    batched = planner(ckpt, quantization={"calib_max_tokens": tokens, "batch_size": 2})
    assert batched.resources.quantize_mem_mb("m", "int4_awq") == expected("on the text", 512)


def test_planner_threads_and_gpus_follow_the_config(checkpoint_factory):
    ckpt = checkpoint_factory("qwen2", hidden_size=128, intermediate_size=256)
    default = planner(ckpt).resources
    assert (default.quantize_threads("m"), default.verify_threads("m"), default.quantize_gpus("m")) == (8, 4, 0)
    assert default.export_threads("m") == 4
    cuda = planner(ckpt, quantization={"device": "cuda", "threads": 3}, verify={"threads": 5}, export={"threads": 6})
    assert (cuda.resources.quantize_threads("m"), cuda.resources.verify_threads("m")) == (3, 5)
    assert (cuda.resources.quantize_gpus("m"), cuda.resources.export_threads("m")) == (1, 6)


def test_gptq_source_counts_as_its_dequantized_weights(checkpoint_factory, tmp_path):
    from .gptq_checkpoint import write_gptq_checkpoint

    gptq = tmp_path / "gptq"
    write_gptq_checkpoint(checkpoint_factory("qwen2", hidden_size=128, intermediate_size=256), gptq, tmp_path / "f")
    os.truncate(gptq / "model.safetensors", 2 * 10**9)  # sparse: a size above the floor, no disk used
    assert planner(gptq).resources.verify_mem_mb("m", "int4_gptq") == verify_mem_mb(
        2 * 10**9 * FORMATS["int4_gptq"].verify_expansion
    )


# A real dry run: the resources Snakemake shows (and a cluster executor gets) per job.

DRY_RUN_CONFIG = scenario("resources_dry_run")
SPARSE_BYTES = 2 * 10**9


def dry_run_jobs(output: str) -> dict[tuple[str, str], dict[str, str]]:
    """(rule, 'model=..., precision=...') -> {'threads': .., 'mem_mb': .., 'gpu': ..} of a dry run's job blocks."""
    jobs = {}
    for block in re.split(r"\n(?=\[[^\]]+\]\nrule )", output):
        rule = re.search(r"^rule (\w+):", block, re.M)
        wildcards = re.search(r"^\s+wildcards: (.+)$", block, re.M)
        if not rule or not wildcards:
            continue
        fields = {}
        threads = re.search(r"^\s+threads: (\d+)$", block, re.M)
        fields["threads"] = threads.group(1) if threads else "1"
        resources_line = re.search(r"^\s+resources: (.+)$", block, re.M)
        for item in resources_line.group(1).split(", ") if resources_line else []:
            key, _, value = item.partition("=")
            fields[key] = value
        jobs[(rule.group(1), wildcards.group(1))] = fields
    return jobs


@pytest.mark.workflow
def test_dry_run_shows_memory_threads_and_gpu_of_quantize_and_verify_jobs(tmp_path, checkpoint_factory):
    ckpt = copy_checkpoint(checkpoint_factory("qwen2", hidden_size=128, intermediate_size=256), tmp_path / "ckpt")
    # Sparse bytes past the weights: a 2 GB "checkpoint" for planning (steps would refuse it; none runs).
    os.truncate(ckpt / "model.safetensors", SPARSE_BYTES)
    vocab = json.loads((ckpt / "config.json").read_text())["vocab_size"]
    write_config(tmp_path, DRY_RUN_CONFIG)
    targets = [
        "quantized/cpu_fp8/manifest.json",
        "quantized/cpu_int4_awq/manifest.json",
        "quantized/gpu_int4_awq/manifest.json",
        "reports/cpu_fp16/verify.json",
        "reports/gpu_int4_awq/verify.json",
    ]
    plan = run_snakemake(tmp_path, "-n", "-p", *targets).output
    jobs = dry_run_jobs(plan)

    cpu_fp8 = jobs[("quantize_llm", "model=cpu, precision=fp8")]
    cpu_awq = jobs[("quantize_llm", "model=cpu, precision=int4_awq")]
    gpu_awq = jobs[("quantize_llm", "model=gpu, precision=int4_awq")]
    calibrate = jobs[("calibrate_llm", "model=cpu")]
    # The shared calibration's jobs hold a layer (and the states, or the embedding table), not the model: they
    # ask for less than AWQ's pass on the text, whatever the checkpoint's bytes.
    config = json.loads((ckpt / "config.json").read_text())
    hidden, tokens = config["hidden_size"], 512 * 2048
    assert calibrate["mem_mb"] == str(
        resources.layerwise_mem_mb(
            "calibrate", layer_bytes=layer_bytes(config), state_bytes=4 * tokens * hidden, table_bytes=0
        )
    )
    assert cpu_fp8["mem_mb"] == str(
        resources.layerwise_mem_mb(
            "from statistics", layer_bytes=layer_bytes(config), state_bytes=0, table_bytes=4 * vocab * hidden
        )
    )
    on_text = resources.layerwise_mem_mb(
        "on the text", layer_bytes=layer_bytes(config), state_bytes=4 * tokens * hidden, table_bytes=4 * vocab * hidden
    )
    assert cpu_awq["mem_mb"] == gpu_awq["mem_mb"] == str(on_text)
    assert on_text > int(calibrate["mem_mb"]) >= int(cpu_fp8["mem_mb"]) >= FLOOR_MB
    # device cpu: no GPU; device cuda: one GPU (any SM).
    assert cpu_fp8["gpu"] == cpu_awq["gpu"] == calibrate["gpu"] == "0" and gpu_awq["gpu"] == "1"
    assert "constraint" not in gpu_awq
    # threads: the config's, capped at --cores 2 (the default of 8 shows as 2).
    assert cpu_fp8["threads"] == cpu_awq["threads"] == "1" and gpu_awq["threads"] == "2"

    verify_mb = str(verify_mem_mb(SPARSE_BYTES))
    cpu_verify = jobs[("verify_onnx", "model=cpu, precision=fp16")]
    gpu_verify = jobs[("verify_onnx", "model=gpu, precision=int4_awq")]
    assert cpu_verify["mem_mb"] == gpu_verify["mem_mb"] == verify_mb and int(verify_mb) > FLOOR_MB
    assert cpu_verify["threads"] == "1" and gpu_verify["threads"] == "2"
    assert "gpu" not in cpu_verify
    # The step commands get the threads (torch.set_num_threads).
    assert "--device cpu --threads 1 >" in plan and "--device cuda --threads 2 >" in plan
    assert "--report reports/cpu_fp16/verify.json --threads 1 >" in plan
