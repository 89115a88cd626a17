"""The accuracy report: what each precision of a model costs in quality, measured on its exports themselves.

Each configured precision's LLM export runs (``onnx.reference`` with the CPU implementations of the plugin
ops, as verify-onnx runs it, but one decoder layer at a time: ``streamed_graph.py``) over windows of text
that calibration never read: the built-in corpus's held-out split, or ``accuracy.dataset``. Each window is
one prefill, and every next token is scored:

- ``perplexity``: exp of the mean negative log-likelihood of the text's next tokens;
- ``next_token_accuracy``: how often the most likely token is the text's next one;
- ``top1_agreement``: how often the most likely token is the fp16 export's (the baseline: 1 for itself);
- ``mean_kl``: KL(fp16 export || this export) of the next-token distributions, nats per token;
- ``layer_relative_error``: per decoder layer, ||h - h_fp16|| / ||h_fp16|| of its output hidden states over the
  first :data:`LAYER_ROWS` positions of each window: where along the depth a precision departs from fp16
  (what ``quantization.exclude`` acts on);
- with served LoRA adapters (``adapters``), the same figures for each precision's ``lora_model.onnx`` fed the
  processed adapter (row ``<precision>+lora:<adapter>``), against the fp16 export with that adapter: what a
  precision costs the adapted model;
- ``export_bytes``: the export directory on disk; ``engine_bytes_estimate``: the graph and its weights file,
  what a TensorRT engine holds (the embedding table and tokenizer stay beside it).

Memory holds one decoder layer's weights (the LM head last), the logits of :data:`CHUNK_TOKENS` tokens and,
when other precisions follow, the fp16 export's log-probabilities (float32: samples x tokens x vocabulary,
0.6 GB for 8 x 128 tokens of a 152k vocabulary) and its hidden states at those positions (float16: samples x
64 x layers x hidden, 134 MB for 8 windows of an 8B shape).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgellm_steps.artifacts import steps
from edgellm_steps.artifacts.atomic import claim_file, write_claimed
from edgellm_steps.artifacts.manifest import check_step_output
from edgellm_steps.artifacts.safetensors_io import SafetensorsFile
from edgellm_steps.errors import EdgeLLMError
from edgellm_steps.graph.onnx_builder import ONNX_NAME
from edgellm_steps.lora.insert_lora import LORA_ONNX_NAME, check_lora_graph
from edgellm_steps.lora.process_lora import PROCESSED_WEIGHTS
from edgellm_steps.quant.calibration import BUILTIN, held_out_texts
from edgellm_steps.quant.formats import FLOAT_WEIGHTS
from edgellm_steps.verify.accuracy_page import page_html, plot_png
from edgellm_steps.verify.parity import config_rope_table
from edgellm_steps.verify.reference import LLMRunner

log = logging.getLogger(__name__)

#: The precision every other one is compared with: the float export.
BASELINE = FLOAT_WEIGHTS


def held_out_windows(tokenizer, texts: Iterable[str], samples: int, tokens: int) -> list[list[int]]:
    """``samples`` windows of ``tokens`` token ids cut from the text stream (paragraphs joined by EOS).

    Unlike calibration the text is never cycled: a window scored twice would count twice.
    """
    separator = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    needed = samples * tokens
    stream: list[int] = []
    for text in texts:
        stream += tokenizer(text, add_special_tokens=False)["input_ids"] + separator
        if len(stream) >= needed:
            return [stream[i * tokens : (i + 1) * tokens] for i in range(samples)]
    raise EdgeLLMError(
        f"the held-out text gives {len(stream)} tokens, fewer than accuracy.samples x accuracy.tokens = {needed}; "
        "add text to accuracy.dataset or lower samples or tokens"
    )


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-probabilities, in float64."""
    shifted = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


#: Tokens a window is fed in at a time (chunked prefill through the KV cache, as the runtime may run it), and
#: logit rows turned into log-probabilities at a time: memory is bounded whatever the window and vocabulary.
CHUNK_TOKENS = 512
ROWS = 32
#: Positions of each window whose hidden states every layer is compared at (the first ones of its first chunk).
LAYER_ROWS = 64


@dataclass
class Tally:
    """Sums over the scored positions of every window; :meth:`figures` turns them into the report's numbers."""

    positions: int = 0
    nll: float = 0.0
    correct: int = 0
    agree: int = 0
    kl: float = 0.0

    def add(
        self, logits: np.ndarray, baseline: np.ndarray | None, targets: list[int], *, keep: bool = False
    ) -> np.ndarray | None:
        """Score positions whose next tokens are ``targets`` from their ``logits`` ([n, V], n = len(targets)),
        against the ``baseline`` log-probabilities ([n, V]; None: these are the baseline's), :data:`ROWS` rows at
        a time in float64. With ``keep``, returns their log-probabilities (float32)."""
        kept = np.empty(logits.shape, np.float32) if keep else None
        for first in range(0, len(targets), ROWS):
            rows = slice(first, first + ROWS)
            scored = log_softmax(logits[rows])
            reference = scored if baseline is None else baseline[rows].astype(np.float64)
            wanted = np.asarray(targets[rows])
            self.positions += len(wanted)
            self.nll -= float(scored[np.arange(len(wanted)), wanted].sum())
            self.correct += int((scored.argmax(-1) == wanted).sum())
            self.agree += int((scored.argmax(-1) == reference.argmax(-1)).sum())
            self.kl += float((np.exp(reference) * (reference - scored)).sum())
            if kept is not None:
                kept[rows] = scored
        return kept

    def figures(self) -> dict[str, float]:
        n = self.positions
        return {
            "perplexity": math.exp(self.nll / n),
            "mean_nll": self.nll / n,
            "next_token_accuracy": self.correct / n,
            "top1_agreement": self.agree / n,
            "mean_kl": self.kl / n,
        }


@dataclass
class LayerErrors:
    """Per decoder layer, the squared distance of the hidden states from the baseline's and the baseline's
    squared norm, summed over the compared positions (float64)."""

    distance: np.ndarray | None = None
    norm: np.ndarray | None = None

    def add(self, hidden: np.ndarray, baseline: np.ndarray) -> None:
        """``hidden`` and ``baseline``: [layers, positions, hidden size] of one window."""
        ours, theirs = hidden.astype(np.float64), baseline.astype(np.float64)
        distance, norm = ((ours - theirs) ** 2).sum(axis=(1, 2)), (theirs**2).sum(axis=(1, 2))
        self.distance = distance if self.distance is None else self.distance + distance
        self.norm = norm if self.norm is None else self.norm + norm

    def relative_errors(self) -> list[float]:
        if self.distance is None or self.norm is None:
            return []
        return [float(e) for e in np.sqrt(self.distance / np.maximum(self.norm, np.finfo(np.float64).tiny))]


def export_sizes(onnx_dir: Path) -> dict[str, int]:
    """Bytes of the export directory, and of what an engine is built from: the graph and its weights file."""
    files = [f for f in onnx_dir.iterdir() if f.is_file()]
    graph = [f for f in files if f.name == ONNX_NAME or f.suffix == ".data"]
    return {
        "export_bytes": sum(f.stat().st_size for f in files),
        "engine_bytes_estimate": sum(f.stat().st_size for f in graph),
    }


def _check_export(precision: str, onnx_dir: Path) -> None:
    check_step_output(onnx_dir, steps.EXPORT_LLM)
    if "reduced_vocab_size" in json.loads((onnx_dir / "config.json").read_text()):
        raise EdgeLLMError(
            f"{onnx_dir} ({precision}) has a reduced vocabulary: its logits lack the ids it dropped, so its "
            "perplexity is not comparable; measure the model without reduced_vocab"
        )


@dataclass
class Variant:
    """One row of the report: an export's ``graph`` run with ``lora`` feeds (a processed adapter's tensors)."""

    name: str
    onnx_dir: Path
    graph: str = ONNX_NAME
    lora: dict[str, np.ndarray] | None = None


def _measure_group(
    group: list[Variant], windows: list[list[int]], rope: np.ndarray, tokens: int
) -> dict[str, dict[str, Any]]:
    """The figures of each variant, against the group's first (its baseline): every window fed in chunks
    through the KV cache, the baseline's log-probabilities and hidden states kept while the others run."""
    baseline: dict[tuple[int, int], np.ndarray] = {}
    baseline_layers: dict[int, np.ndarray] = {}
    results: dict[str, dict[str, Any]] = {}
    for position, variant in enumerate(group):
        is_baseline = position == 0
        runner = LLMRunner(
            variant.onnx_dir, rope, batch=1, capacity=tokens, graph=variant.graph, lora=variant.lora, streamed=True
        )
        runner.session.layer_rows = LAYER_ROWS
        tally, layers = Tally(), LayerErrors()
        for k, window in enumerate(windows):
            runner.reset()
            for start in range(0, tokens, CHUNK_TOKENS):
                logits = runner.step([window[start : start + CHUNK_TOKENS]], all_logits=True)[0]
                if start == 0:
                    hidden = np.stack([h[0, :LAYER_ROWS] for h in runner.session.layer_outputs])
                    if is_baseline:
                        baseline_layers[k] = hidden
                    layers.add(hidden, baseline_layers[k])
                targets = window[start + 1 : start + CHUNK_TOKENS + 1]
                reference = None if is_baseline else baseline[k, start]
                keep = is_baseline and len(group) > 1
                kept = tally.add(logits[: len(targets)], reference, targets, keep=keep)
                if kept is not None:
                    baseline[k, start] = kept
        figures = {**tally.figures(), "layer_relative_error": layers.relative_errors()}
        results[variant.name] = {
            **figures,
            **export_sizes(variant.onnx_dir),
            "onnx_dir": str(variant.onnx_dir),
            "graph": variant.graph,
            "baseline": group[0].name,
        }
        log.info(
            "%s: perplexity %.4g, top-1 agreement %.2f%%, mean KL %.3g",
            variant.name,
            figures["perplexity"],
            100 * figures["top1_agreement"],
            figures["mean_kl"],
        )
    return results


def measure_accuracy(
    exports: dict[str, Path],
    checkpoint: Path,
    *,
    model: str = "model",
    dataset: str | None = None,
    samples: int = 8,
    tokens: int = 128,
    adapters: dict[str, Path] | None = None,
) -> dict[str, Any]:
    """The report's figures for ``exports`` (precision -> LLM export directory, the fp16 one among them), and
    with ``adapters`` (name -> process-lora output directory) for each export's LoRA graph fed each adapter.

    ``checkpoint`` is the float source the exports came from: its tokenizer cuts the windows and its config
    gives the RoPE table the runtime feeds.
    """
    import transformers

    exports = {precision: Path(directory) for precision, directory in exports.items()}
    if BASELINE not in exports:
        raise EdgeLLMError(f"the accuracy report compares every precision with the {BASELINE} export; give it one")
    for precision, directory in exports.items():
        _check_export(precision, directory)
    order = [BASELINE, *sorted(p for p in exports if p != BASELINE)]
    groups = [[Variant(p, exports[p]) for p in order]]
    if adapters:
        for p in order:
            check_lora_graph(exports[p])
    for adapter, directory in sorted((adapters or {}).items()):
        check_step_output(Path(directory), steps.PROCESS_LORA)
        weights = SafetensorsFile(Path(directory) / PROCESSED_WEIGHTS)
        tensors = {name: weights.read_array(name) for name in weights.names()}
        groups.append([Variant(f"{p}+lora:{adapter}", exports[p], LORA_ONNX_NAME, tensors) for p in order])
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(checkpoint))
    windows = held_out_windows(tokenizer, held_out_texts(dataset), samples, tokens)
    rope = config_rope_table(Path(checkpoint), tokens)
    results: dict[str, dict[str, Any]] = {}
    for group in groups:
        results.update(_measure_group(group, windows, rope, tokens))
    return {
        "model": model,
        "model_dir": str(checkpoint),
        "baseline": BASELINE,
        "inputs": {
            "dataset": dataset or BUILTIN,
            "split": "held-out" if dataset in (None, "", BUILTIN) else "given",
            "samples": samples,
            "tokens": tokens,
            "scored_tokens": samples * (tokens - 1),
        },
        "precisions": results,
        "adapters": {name: str(directory) for name, directory in sorted((adapters or {}).items())},
    }


def accuracy_report(
    exports: dict[str, Path],
    checkpoint: Path,
    *,
    report: Path,
    page: Path | None = None,
    plot: Path | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Measure (:func:`measure_accuracy`, ``options`` passed on) and write the JSON ``report``, and the ``plot``
    (PNG) and HTML ``page`` when given; each file is written whole or not at all, the JSON last."""
    claims = {path: claim_file(Path(path)) for path in (plot, page, report) if path is not None}
    figures = measure_accuracy(exports, checkpoint, **options)
    png = plot_png(figures) if plot is not None or page is not None else b""
    if plot is not None:
        write_claimed(claims[plot], png)
    if page is not None:
        write_claimed(claims[page], page_html(figures, png))
    write_claimed(claims[report], (json.dumps(figures, indent=2) + "\n").encode())
    return figures
