"""Host memory (Snakemake ``mem_mb``) of quantize-llm and verify-onnx jobs, from measured peaks.

A job's peak RSS is modelled as

    peak = factor x (source checkpoint weight bytes) + logit_bytes x batch x tokens x vocab_size

and the job requests ``max(FLOOR_MB, ceil(MARGIN x peak / MiB))`` (MiB, like the engine
rule's mem_mb: the unit of Slurm's ``--mem``). ``factor`` folds in the model held in float32
(calibration and verification run float32 on the CPU: twice a bf16 checkpoint's bytes), the
checkpoint pages transformers maps in while loading, the step's own copies and the fixed cost
of Python, torch and ModelOpt, so a model much larger than the measured one is over-requested
rather than under.
The second term grows with the calibration batch (``batch`` samples of ``tokens`` tokens in one
forward pass); the float32 logits, ``batch x tokens x vocab_size`` of them, are most of it.

Measured with ``python -m bench.quantize_bench`` (``--batch``, ``--verify``; about 26 minutes of
runs) on the Qwen2.5-0.5B-shaped random checkpoint (494M parameters, bf16, tied embeddings, vocab
151936, hidden 896, 24 layers; 988,097,824 weight bytes), 512-token samples, ``--device cpu``. The
runs, with their machine and settings, are the records of ``bench/results/quantize_bench.json``
whose ``cited_by`` names this module (:func:`measured_runs` reads them; the tests hold every
request above its run's peak). What the runs showed:

- fp8, int8_sq, nvfp4 and fp16 with LM-head/KV overrides, batch 1: 3.3 GiB whatever the number
  of samples (fp8: 2, 32 and 512 samples; nvfp4 32 and 512). fp8 at batch 8: 4.9 GiB, about
  one float32 logit (4 bytes) more per sample token: ``logit_bytes`` 4, ``factor`` 3.3.
- int4_awq: batch 1: 5.7 GiB (1 and 4 samples alike); batch 4 (one batch): 3.7 GiB; batch 16:
  8.9 GiB with one batch (16 samples), 10.2 GiB with two or more (32 samples; 512 samples
  gave the same in an earlier run). So its peak does not grow with the number of samples
  beyond the second batch, and is not monotonic in the batch at small batches (batch 1 peaks
  above batch 4: allocator behaviour, reproducible). The linear model goes through the
  highest points: ``factor`` 5.9 (batch 1) and ``logit_bytes`` 4.5 (batch 16 with two batches);
  it over-requests batch 4.
- verify-onnx (transformers in float32 plus the ONNX reference run, a 10-token prompt): fp16
  export 8.2 GiB (two runs), fp8 export 6.9 GiB: ``factor`` 8.9 for every precision.

The logit term is fitted on one shape: a model whose activations (hidden and intermediate
sizes) outweigh its vocabulary has a larger per-token cost, but its weight term dominates.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from edgellm_steps.quant.formats import FLOAT_WEIGHTS, FORMATS, PeakModel
from edgellm_steps.quant.unified import LAYOUTS

MIB = 2**20

#: Requests are the modelled peak times this margin (allocator slack, other corpora, other shapes).
MARGIN = 1.25
#: No job requests less: Python, torch and a tokenizer alone take about 1 GB (and the Slurm
#: profile's default-resources give 4000 MB to every other job).
FLOOR_MB = 4096


#: Job kind -> measured peak model (see the module docstring). Keys: quantize-llm's weight
#: format (the format table's ``quantize_peak``; a job with an LM-head or KV-cache override uses its
#: weights' row: the overrides add a few quantizers to the same calibration), and "verify" for
#: verify-onnx (any precision; a held format's bytes count ``verify_expansion`` times).
PEAKS: dict[str, PeakModel] = {
    **{name: row.quantize_peak for name, row in FORMATS.items() if row.quantize_peak is not None},
    # Fitted when verify ran the whole graph; streamed it peaks at 3.3x (3232 MiB, 0.5B fp16). Kept: the vision
    # verify jobs size by it too and have not been measured since.
    "verify": PeakModel(factor=8.9),
}


#: dequantize-fp8's peak RSS in MiB: 357 for the Qwen2.5-0.5B-shaped release (0.63 GB of block-FP8 shards ->
#: 0.99 GB bf16, its 272 MB embedding copied in 64 MiB slices), ``python -m bench.dequantize_bench``,
#: bench/results/dequantize_bench.json. The step streams, so a larger model adds only its widest row of blocks.
DEQUANTIZE_PEAK_MIB = 357


@dataclass(frozen=True)
class MergePeak:
    """merge-lora's peak RSS: the interpreter, torch and the slices in flight (MiB), plus multiples of the widest
    adapted weight in float32 (the buffer its ``B @ A`` is computed into, held whole while its slices merge) and
    of the adapter's weights file (read whole)."""

    base_mib: float
    weight: float
    adapter: float


#: Fitted to ``python -m bench.merge_lora_bench`` (bench/results/merge_lora_bench.json), Llama-3.1-8B shape, rank
#: 16 on every projection: 733 MiB (32 layers, 80 MiB of adapter; widest weight gate_proj, 224 MiB in float32) and
#: 2437 MiB with the LM head adapted too (2004 MiB in float32); 641 and 2361 MiB with 2 layers (5 and 9 MiB).
MERGE_PEAK = MergePeak(base_mib=450, weight=1.0, adapter=1.25)


@dataclass(frozen=True)
class Measured:
    """One bench run on the 0.5B checkpoint: peak RSS in MiB (ru_maxrss / 1024)."""

    kind: str
    batch: int
    samples: int
    peak_mib: int


#: The bench results this model is fitted to.
RESULTS = Path(__file__).resolve().parents[2] / "bench" / "results" / "quantize_bench.json"
CITED_BY = "edgellm_steps/workflow/resources.py MEASURED"


def measured_runs(results: Path = RESULTS) -> tuple[Measured, ...]:
    """The runs of ``bench/results/quantize_bench.json`` this model cites, in MiB (ru_maxrss / 1024)."""
    runs = json.loads(results.read_text())
    return tuple(
        Measured(run["kind"], batch=run["batch"], samples=run["samples"], peak_mib=run["peak_rss_mib"])
        for run in runs
        if run.get("cited_by") == CITED_BY
    )


def request_mb(peak_bytes: float) -> int:
    """The mem_mb a job with this modelled peak requests: with the margin, at least the floor."""
    return max(FLOOR_MB, math.ceil(MARGIN * peak_bytes / MIB))


def quantize_mem_mb(weight_bytes: int, weights: str, *, batch: int, tokens: int, vocab_size: int) -> int:
    """mem_mb of a quantize-llm job; ``weights`` is the weight format (fp8, int8_sq, int4_awq, nvfp4, fp16)."""
    peak = PEAKS[weights]
    return request_mb(peak.factor * weight_bytes + peak.logit_bytes * batch * tokens * vocab_size)


@dataclass(frozen=True)
class LayerwisePeak:
    """Peak RSS (MiB) of a job of the shared calibration, which holds one decoder layer, never the model:

    peak = base_mib + layer x (one decoder layer in float32) + states x (the cached hidden states:
           samples x tokens x hidden, float32) + table x (the largest matrix written whole: vocab x hidden,
           float32)
    """

    base_mib: float
    layer: float
    states: float
    table: float


#: The layer-by-layer jobs the shared calibration runs: calibrate-llm (its pass holds a layer and the states,
#: inputs and outputs) and quantize-llm from its statistics (a layer, then the embedding table cast whole as it
#: is written). The smallest round constants that cover every measured run (MiB, ru_maxrss):
#:
#: - calibrate-llm: Qwen2.5-0.5B shape (24 layers of 57 MiB in float32), 16 x 128 tokens (states 7 MiB): 953;
#:   64 x 256 (56 MiB): 1243 and 1426; its 2-layer variant, 256 x 512 (448 MiB): 1780; Llama-3.1-8B shape (32
#:   layers of 832 MiB), 16 x 128 (32 MiB): 1626 (bench/shared_calibration_bench.py,
#:   bench/layerwise_quantize_bench.py --shared).
#: - quantize-llm --statistics_dir: 0.5B (embedding table 519 MiB in float32): fp8 1475, int8_sq 1924, nvfp4
#:   1787, fp8-kvfp8 1807; 8B (table 2004 MiB): fp8 3740, nvfp4 3789.
#: - quantize-llm calibrating on the text (int4_awq: AWQ's search needs the activations; batch 16): a layer, the
#:   cached states with each layer's outputs and AWQ's activations of a batch, then the table written whole:
#:   0.5B, 64 x 256: 2310; 8B, 16 x 128: 3711; fp8 on the text (no workflow job does it; the same loop): 0.5B 64 x 256
#:   2033, 8B 16 x 128 3564.
LAYERWISE_PEAKS = {
    "calibrate": LayerwisePeak(base_mib=1300, layer=0.6, states=2, table=0),
    "from statistics": LayerwisePeak(base_mib=1400, layer=0.5, states=0, table=1),
    "on the text": LayerwisePeak(base_mib=1400, layer=0.5, states=8, table=1),
}


def layerwise_mem_mb(kind: str, *, layer_bytes: int, state_bytes: int, table_bytes: int) -> int:
    """mem_mb of a layer-by-layer job (``LAYERWISE_PEAKS``: "calibrate", "from statistics" or "on the text"), with
    the margin."""
    peak = LAYERWISE_PEAKS[kind]
    parts = peak.layer * layer_bytes + peak.states * state_bytes + peak.table * table_bytes
    return request_mb(peak.base_mib * MIB + parts)


def dequantize_mem_mb() -> int:
    """mem_mb of a dequantize-fp8 job: it streams one row of blocks (or 64 MiB of a table) at a time, so its
    peak is the interpreter's and torch's, whatever the checkpoint's size (:data:`DEQUANTIZE_PEAK_MIB`)."""
    return request_mb(DEQUANTIZE_PEAK_MIB * MIB)


def merge_lora_mem_mb(*, widest_weight_bytes: int, adapter_bytes: int) -> int:
    """mem_mb of a merge-lora job: it streams the checkpoint, holding the adapter and, while one weight merges, its
    ``B @ A`` in float32 (``widest_weight_bytes``: the widest adapted weight in float32) (:data:`MERGE_PEAK`)."""
    peak = MERGE_PEAK
    return request_mb(peak.base_mib * MIB + peak.weight * widest_weight_bytes + peak.adapter * adapter_bytes)


def verify_mem_mb(weight_bytes: int, weights: str = FLOAT_WEIGHTS, *, unified: bool = False) -> int:
    """mem_mb of a verify-onnx job (a prompt of a few tokens: no batch term) of a checkpoint in ``weights``;
    a unified export's stored codes count as the float16 weights they dequantize to (``unified.LAYOUTS``)."""
    expansion = LAYOUTS[weights].expansion if unified else FORMATS[weights].verify_expansion
    return request_mb(PEAKS["verify"].factor * expansion * weight_bytes)


#: Tokens of a window the accuracy report feeds at a time, and positions of a window whose hidden states it keeps
#: per layer (``verify/accuracy.py`` ``CHUNK_TOKENS`` and ``LAYER_ROWS``; a test holds them equal: the workflow
#: does not import the runner).
ACCURACY_CHUNK_TOKENS = 512
ACCURACY_LAYER_ROWS = 64


@dataclass(frozen=True)
class AccuracyPeak:
    """The accuracy report's peak: it runs one export at a time, one decoder layer's weights at a time (or the LM
    head), so nothing in it grows with the number of layers but the KV caches. Terms, in bytes of what the job
    holds: the largest float16 weight segment (a layer or the LM head) with its float32 slices; a chunk's logits
    (float16 from the graph, float32 out, scored in float64 rows); the baseline's float32 log-probabilities when
    other precisions follow; the past and present KV caches; the baseline's hidden states (float16, 64 positions
    a window)."""

    base_mib: float
    weights: float
    chunk_logits: float
    baseline_logits: float
    caches: float
    hidden: float


#: Fitted to bench/accuracy_bench.py (MiB, ru_maxrss): the trained tiny Qwen2 (5 exports, 8 x 128 tokens) 447; the
#: Llama-3.1-8B shape (fp16, 1 x 2048 tokens: LM head 1.05 GB, caches 0.27 GB) 2688. Both requests are the floor;
#: the weight term makes a 70B shape's (LM head 2.1 GB) larger.
ACCURACY_PEAK = AccuracyPeak(base_mib=600, weights=1.5, chunk_logits=10, baseline_logits=4, caches=2, hidden=1)


def accuracy_mem_mb(
    *,
    segment_bytes: int,
    vocab_size: int,
    samples: int,
    tokens: int,
    compared: int,
    cache_bytes: int,
    hidden_bytes: int,
) -> int:
    """mem_mb of an accuracy-report job (:data:`ACCURACY_PEAK`): ``segment_bytes`` the largest float16 layer or
    LM head, ``compared`` the precisions besides the baseline, ``cache_bytes`` one sequence's KV caches of
    ``tokens`` tokens, ``hidden_bytes`` the baseline's hidden states kept."""
    peak = ACCURACY_PEAK
    chunk = min(tokens, ACCURACY_CHUNK_TOKENS) * vocab_size
    baseline = samples * tokens * vocab_size if compared else 0
    parts = (
        peak.weights * segment_bytes
        + peak.chunk_logits * chunk
        + peak.baseline_logits * baseline
        + peak.caches * cache_bytes
        + peak.hidden * hidden_bytes
    )
    return request_mb(peak.base_mib * MIB + parts)
