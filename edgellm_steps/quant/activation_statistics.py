"""The shared calibration pass: every activation quantizer's per-channel maxima, once per model and calibration set.

Max calibration (fp8, nvfp4, the LM-head and KV-cache quantizers) and SmoothQuant (int8_sq) read nothing from
the activations but their maxima: a per-tensor quantizer keeps the largest magnitude it sees, SmoothQuant the
largest per input channel. So one float pass through the layers can serve every such precision of a model:
it records, for each activation quantizer a recipe may calibrate (each Linear's input, the KV cache's keys and
values), the largest magnitude per channel over the calibration set. A precision then calibrates each stage
with ModelOpt's own ``mtq.quantize`` and recipe, its forward loop handing each activation quantizer that
vector: the maximum of the maxima is the maximum, per tensor or per channel, so ModelOpt computes exactly
the amax (and SmoothQuant exactly the smoothing) a whole-model run on the calibration set computes, without
running the layers again. AWQ's search needs the activations themselves and keeps its own pass.

The pass is the layer-by-layer loop of ``layerwise.py`` with a statistics recipe (every activation quantizer
per channel, nothing quantized): ModelOpt calibrates with quantization off, so one forward per layer both
collects the maxima and makes the next layer's inputs. The LM head's matrix is never read: its input is the
final norm's output.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgellm_steps.errors import SourceError
from edgellm_steps.quant.model_skeleton import ModelSkeleton, Stage
from edgellm_steps.quant.stages import peak_rss_gib, quantize_stage

log = logging.getLogger(__name__)

#: The statistics pass's recipe: every activation quantizer a recipe may calibrate, per channel (the last
#: axis); no weight quantizer.
STATISTICS_CONFIG: dict[str, Any] = {
    "quant_cfg": [
        {"quantizer_name": "*", "enable": False},
        {"quantizer_name": "*input_quantizer", "cfg": {"num_bits": 8, "axis": -1}},
        {"quantizer_name": "*[kv]_bmm_quantizer", "cfg": {"num_bits": 8, "axis": -1}},
    ],
    "algorithm": "max",
}

#: The file of a statistics directory holding the maxima, one float32 vector per quantizer (by its
#: whole-model name).
STATISTICS_FILE = "statistics.safetensors"
#: Its metadata entry: how the maxima were calibrated, the quantizers a forward calls, the checkpoint's layout.
RECORD_KEY = "edgellm_statistics"


def _is_weight_quantizer(name: str) -> bool:
    """ModelOpt's own test: weight quantizers are calibrated on the weights, not by the forward."""
    return any(part.endswith("weight_quantizer") for part in name.split("."))


def _quantizers(root: Any) -> list[tuple[str, Any]]:
    from modelopt.torch.quantization.nn import TensorQuantizer

    return [(name, module) for name, module in root.named_modules() if isinstance(module, TensorQuantizer)]


@dataclass
class Observed:
    """What the statistics pass saw: each calibrated quantizer's per-channel maxima, and the name of every
    quantizer the model's forward calls (a disabled one records the dtype it is called with in ModelOpt's state,
    one the forward never calls records nothing: a precision's state must show the same)."""

    maxima: dict[str, Any]
    called: set[str]


def _observe(stage: Stage, states: list, observed: Observed, *, next_states: bool) -> list:
    """Calibrate ``stage`` with the statistics recipe on ``states``, into ``observed``; its outputs."""
    import torch

    outputs: list = []
    hooks: list = []

    def forward_loop(root) -> None:
        for name, quantizer in _quantizers(root):
            hooks.append(quantizer.register_forward_pre_hook(lambda *_, name=name: observed.called.add(name)))
        outputs.clear()
        with torch.no_grad():
            for i, h in enumerate(states):
                out = stage.run(h, i)
                if next_states:
                    outputs.append(out)
        for hook in hooks:
            hook.remove()

    root = quantize_stage(stage.modules, STATISTICS_CONFIG, forward_loop)
    for name, quantizer in _quantizers(root):
        if quantizer.is_enabled and quantizer.amax is not None:
            observed.maxima[name] = quantizer.amax.detach().float().cpu().clone()  # the shape its inputs had
    return outputs


def collect_statistics(
    checkpoint: Path,
    auto_class: Any,
    renames: tuple[tuple[str, str], ...],
    batches: list,
    *,
    dtype: Any,
    device: str,
) -> Observed:
    """Each activation quantizer's per-channel maxima over ``batches`` and the quantizers a forward calls, by
    whole-model quantizer name."""
    import torch
    from modelopt.torch.quantization.plugins.huggingface import register_hf_attentions_on_the_fly

    model = ModelSkeleton(checkpoint, auto_class, renames, dtype, device)
    register_hf_attentions_on_the_fly(model.model)
    states = model.embedded(batches)
    calls = model.layer_calls(batches)
    observed = Observed({}, set())
    for index, layer in enumerate(model.layers):
        started = time.monotonic()
        model.materialize(layer)
        states = _observe(model.layer_stage(index, calls[index]), states, observed, next_states=True)
        calls[index] = []
        model.release(layer)
        seconds = time.monotonic() - started
        log.info(
            "layer %d/%d observed in %.1f s (peak RSS so far %.2f GiB)",
            index + 1,
            len(model.layers),
            seconds,
            peak_rss_gib(),
        )
    norm, head = model.norm, model.lm_head
    model.materialize(norm)
    # The head's input is the final norm's output; its matrix (a row per vocabulary entry) is never read: a
    # one-row stand-in takes its place, so the head's own forward runs (calling every quantizer it calls) at the
    # cost of one output column.
    head.weight = torch.nn.Parameter(torch.zeros((1, head.in_features), dtype=dtype, device=device))
    if head.bias is not None:
        head.bias = torch.nn.Parameter(torch.zeros(1, dtype=dtype, device=device))
    _observe(model.head_stage(), states, observed, next_states=False)
    return observed


def statistics_forward_loop(root: Any, statistics: dict[str, Any], *, dtype: Any, device: str) -> Callable[[Any], None]:
    """A forward loop for ``mtq.quantize`` on ``root`` (a stage's container) that hands each enabled activation
    quantizer its recorded maxima, and each disabled quantizer a value of the dtype a forward would show it
    (ModelOpt records that dtype in its state). Weight quantizers are ModelOpt's own business: it calibrates
    them on the weights before the loop runs."""
    import torch

    def forward_loop(_model) -> None:
        for name, quantizer in _quantizers(root):
            if not quantizer.is_enabled:
                if name in statistics.called:
                    quantizer(torch.zeros(1, dtype=dtype, device=device))
            elif not _is_weight_quantizer(name):
                if name not in statistics.maxima:
                    raise SourceError(
                        f"the calibration statistics hold nothing for {name}: this precision's recipe calibrates a "
                        "quantizer the statistics pass does not observe"
                    )
                quantizer(statistics.maxima[name].to(device=device, dtype=dtype))

    return forward_loop


def weights_layout(checkpoint: Path) -> str:
    """A digest of the checkpoint's tensor names, shapes and dtypes: statistics are only read back for the model
    they were taken from (the same architecture and shapes; the workflow pairs the contents)."""
    import xxhash

    from edgellm_steps.artifacts.checkpoint import TensorStore

    store = TensorStore(checkpoint)
    layout = "\n".join(f"{name} {store.shape(name)} {store.dtype(name)}" for name in sorted(store.names()))
    return xxhash.xxh3_64_hexdigest(layout.encode())


def save_statistics(observed: Observed, directory: Path, calibration: dict[str, Any], checkpoint: Path) -> None:
    """Write the maxima (safetensors, one float32 vector per quantizer) into ``directory``; the called quantizers,
    how the maxima were calibrated and the layout of the checkpoint they were taken from as its metadata."""
    import json

    from safetensors.torch import save_file

    # One metadata entry: safetensors writes its metadata map in no fixed order, and the same pass must write
    # the same bytes (a rerun that changes nothing leaves every precision made from it current).
    record = {
        "calibration": calibration,
        "called": sorted(observed.called),
        "weights_layout": weights_layout(checkpoint),
    }
    metadata = {RECORD_KEY: json.dumps(record, sort_keys=True)}
    save_file(dict(sorted(observed.maxima.items())), str(directory / STATISTICS_FILE), metadata=metadata)


def load_statistics(directory: Path, checkpoint: Path) -> tuple[Observed, dict[str, Any]]:
    """(the statistics, how they were calibrated) as calibrate-llm wrote them into ``directory``, checked to be
    ``checkpoint``'s."""
    import json

    from safetensors import safe_open

    path = directory / STATISTICS_FILE
    if not path.is_file():
        raise SourceError(f"{path} does not exist: run calibrate-llm on the model first")
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
        maxima = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (safe_open has no iterator)
    record = json.loads(metadata[RECORD_KEY]) if RECORD_KEY in metadata else None
    if not isinstance(record, dict) or any(key not in record for key in ("calibration", "called", "weights_layout")):
        raise SourceError(f"{path} is not a calibration statistics file (no calibration record): rerun calibrate-llm")
    if record["weights_layout"] != weights_layout(checkpoint):
        raise SourceError(
            f"{path} was taken from another model than {checkpoint} (other tensors or shapes): rerun calibrate-llm "
            "on this checkpoint"
        )
    return Observed(maxima, set(record["called"])), record["calibration"]
