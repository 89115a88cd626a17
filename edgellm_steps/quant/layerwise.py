"""Layer-by-layer calibration: ModelOpt's own ``mtq.quantize`` on one decoder layer at a time.

Max calibration, SmoothQuant and AWQ-lite are per-Linear algorithms over the float activations
that reach each Linear; ModelOpt calibrates with quantization disabled, so in a whole-model run
the inputs of layer i+1 are the float outputs of layer i. Calibrating each layer alone, on the
float outputs of the layer before, therefore computes the same statistics, while only one
layer's weights are ever in memory.

The model exists as a skeleton (every parameter on the ``meta`` device, buffers such as the rope
tables real), built from the config, so the model's own forward makes each layer's inputs (the
position embeddings, the masks, multimodal positions) exactly as a whole-model run does: one
forward per batch with every decoder layer replaced by a recorder captures what each layer is
called with. Each *stage* (a decoder layer; then the final norm with the LM head) is then

1. materialized from the checkpoint's shards (the stored tensors cast as ``from_pretrained`` casts
   them);
2. run in float on the cached hidden states, whose outputs are the next stage's inputs;
3. quantized by ``mtq.quantize`` inside a container that gives its modules their whole-model names
   (so every recipe pattern matches as it does on the whole model), its forward loop replaying the
   cached inputs;
4. handed over (its tensors under the whole-model names, its ModelOpt state) and freed.

A precision whose calibration reads only activation maxima (``activation_statistics.py``) skips steps 2
and 3's forwards: ``mtq.quantize``'s forward loop hands each activation quantizer the maxima the shared
statistics pass recorded, and no stage runs at all.

Everything else the checkpoint holds (the embeddings, a vision tower) has no calibrated quantizer and
is passed through as stored, in its stored dtype. The embeddings are never materialized: the calibration
tokens' rows are read once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgellm_steps.errors import SourceError
from edgellm_steps.quant.activation_statistics import Observed, statistics_forward_loop
from edgellm_steps.quant.model_skeleton import ModelSkeleton, Stage
from edgellm_steps.quant.stages import peak_rss_gib, quantize_stage

log = logging.getLogger(__name__)


@dataclass
class CalibratedStage:
    """A calibrated stage: its tensors under their whole-model names and its ModelOpt state."""

    name: str
    tensors: dict[str, Any]
    modelopt_state: dict[str, Any]
    seconds: float = 0.0


def _calibrated(stage: Stage, root: Any, started: float) -> CalibratedStage:
    import modelopt.torch.opt as mto

    # No copies: releasing the stage moves its modules to the meta device, leaving these tensors to the caller.
    tensors = {name: t.detach() for name, t in root.state_dict().items()}
    return CalibratedStage(stage.name, tensors, mto.modelopt_state(root), time.monotonic() - started)


def calibrate_stage(
    stage: Stage, states: list, config: dict[str, Any], *, next_states: bool
) -> tuple[CalibratedStage, list | None]:
    """Quantize ``stage`` with ModelOpt on ``states``; its float outputs first when the next stage needs them."""
    import torch

    started = time.monotonic()
    with torch.no_grad():
        outputs = [stage.run(h, i) for i, h in enumerate(states)] if next_states else None

    def forward_loop(_model) -> None:
        with torch.no_grad():
            for i, h in enumerate(states):
                stage.run(h, i)

    return _calibrated(stage, quantize_stage(stage.modules, config, forward_loop), started), outputs


def calibrate_stage_from_statistics(
    stage: Stage, statistics: Observed, config: dict[str, Any], *, dtype: Any, device: str
) -> CalibratedStage:
    """Quantize ``stage`` with ModelOpt, its activation quantizers handed the shared pass's maxima (no forward)."""
    started = time.monotonic()

    def forward_loop(root) -> None:
        statistics_forward_loop(root, statistics, dtype=dtype, device=device)(root)

    return _calibrated(stage, quantize_stage(stage.modules, config, forward_loop), started)


def _position(quantizer: str, order: dict[str, int]) -> int:
    """The whole-model position of the stage module holding ``quantizer`` (its longest path prefix in ``order``)."""
    parts = quantizer.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        position = order.get(".".join(parts[:cut]))
        if position is not None:
            return position
    return len(order)


def merged_modelopt_state(states: list[dict[str, Any]], order: dict[str, int]) -> dict[str, Any]:
    """The whole model's ModelOpt state from its stages': the same modes, each quantizer's metadata united, in
    the whole model's order of the stage modules, ``order``: the data a whole-model run saves, in its order."""
    first = states[0]
    modes = []
    for position, (mode, mode_state) in enumerate(first["modelopt_state_dict"]):
        metadata = mode_state.get("metadata", {})
        if "quantizer_state" in metadata:
            united: dict[str, Any] = {}
            for state in states:
                other_mode, other = state["modelopt_state_dict"][position]
                if other_mode != mode or other["config"] != mode_state["config"]:
                    raise SourceError(f"stage states disagree on ModelOpt mode {mode}")
                united.update(other["metadata"]["quantizer_state"])
            # Stage by stage in the whole model's module order; within a stage, in its own (the subtree's) order.
            united = dict(sorted(united.items(), key=lambda item: _position(item[0], order)))
            mode_state = {**mode_state, "metadata": {**metadata, "quantizer_state": united}}
        modes.append((mode, mode_state))
    return {**first, "modelopt_state_dict": modes}


@dataclass
class LayerwiseResult:
    """What a layer-by-layer quantization produced besides its tensors (already written)."""

    modelopt_state: dict[str, Any]
    model: Any  # the skeleton: its config and generation config are the checkpoint's


def quantize_layerwise(
    checkpoint: Path,
    auto_class: Any,
    renames: tuple[tuple[str, str], ...],
    config: dict[str, Any],
    batches: list | None = None,
    *,
    statistics: Observed | None = None,
    dtype: Any,
    device: str,
    write: Callable[[str, Any], None],
    stage_written: Callable[[], None] = lambda: None,
    calibrate_head: bool = True,
) -> LayerwiseResult:
    """Quantize ``checkpoint`` with ModelOpt's ``config`` one stage at a time; ``write(name, tensor)`` receives
    every tensor of the quantized model under the name ``save_pretrained`` would write it, and
    ``stage_written()`` is called after each stage's (so a writer need not hold one stage while the next runs).

    Calibrated either on ``batches`` (each stage runs on the float outputs of the one before) or from
    ``statistics``, the shared pass's maxima (``activation_statistics.py``: no stage runs at all).
    ``calibrate_head``: whether the recipe quantizes the LM head (otherwise it stays on the meta device)."""
    from modelopt.torch.quantization.plugins.huggingface import register_hf_attentions_on_the_fly

    if (batches is None) == (statistics is None):
        raise ValueError("quantize_layerwise calibrates on batches or from statistics: give exactly one")
    model = ModelSkeleton(checkpoint, auto_class, renames, dtype, device)
    # ModelOpt inserts KV-cache quantizers into the attention classes it registers from a whole HF model.
    register_hf_attentions_on_the_fly(model.model)
    if batches is not None:
        states = model.embedded(batches)
        calls = model.layer_calls(batches)
        log.info("embedded %d batches (peak RSS so far %.2f GiB)", len(batches), peak_rss_gib())
    else:
        states, calls = None, [[] for _ in model.layers]
    stage_states, claimed, stages_seen = [], set(), []

    def calibrate(stage: Stage, *, next_states: bool) -> CalibratedStage:
        nonlocal states
        if statistics is not None:
            return calibrate_stage_from_statistics(stage, statistics, config, dtype=dtype, device=device)
        done, outputs = calibrate_stage(stage, states, config, next_states=next_states)
        states = outputs
        return done

    def finish(stage: Stage, done: CalibratedStage) -> None:
        for name, tensor in done.tensors.items():
            claimed.add(name)
            if not (model.tied and name == f"{model.name_of(model.lm_head)}.weight"):
                write(model.saved_name(name), tensor)
        stage_states.append(done.modelopt_state)
        stages_seen.append(stage)
        stage_written()
        done.tensors = {}  # written: the next stage must not find this one still in memory
        for module in stage.modules.values():
            model.release(module)

    for index, layer in enumerate(model.layers):
        model.materialize(layer)
        stage = model.layer_stage(index, calls[index])
        calls[index] = []
        done = calibrate(stage, next_states=True)
        log.info(
            "layer %d/%d calibrated in %.1f s (peak RSS so far %.2f GiB)",
            index + 1,
            len(model.layers),
            done.seconds,
            peak_rss_gib(),
        )
        finish(stage, done)
    stage = model.head_stage()
    if calibrate_head:
        for module in stage.modules.values():
            model.materialize(module)
    elif states is not None:
        # Nothing to calibrate in the head: ModelOpt still converts it (its disabled quantizers are part of the
        # state, and record the dtype they see), but on the meta device, where the logits cost nothing; its
        # weights are written as stored, like the embeddings.
        states = [h.to("meta") for h in states]
    done = calibrate(stage, next_states=False)
    states = None
    if not calibrate_head:
        done.tensors = {name: t for name, t in done.tensors.items() if t.device.type != "meta"}
    finish(stage, done)
    log.info("final norm and LM head calibrated in %.1f s (peak RSS so far %.2f GiB)", done.seconds, peak_rss_gib())
    rest = model.rest_stage()
    # The rest's quantizers only record the dtype of what the embedding returns (on the meta device): one
    # batch of token ids shows them that as well as all.
    ids = batches if batches is not None else [_one_token()]
    done, _ = calibrate_stage(rest, ids, config, next_states=False)
    stage_states.append(done.modelopt_state)
    for name, tensor in model.passthrough_tensors(claimed):
        write(model.saved_name(name), tensor)
        del tensor  # before the next one is read (an 8B model's embedding table is 1 GB in bf16)
    log.info("the other tensors written (peak RSS so far %.2f GiB)", peak_rss_gib())
    staged = {path for stage in (*stages_seen, rest) for path in stage.modules}
    order = {name: at for at, (name, _) in enumerate(model.model.named_modules()) if name in staged}
    return LayerwiseResult(merged_modelopt_state(stage_states, order), model.model)


def _one_token() -> Any:
    import torch

    return torch.zeros((1, 1), dtype=torch.long)
