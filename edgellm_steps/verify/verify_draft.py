"""verify-onnx for an EAGLE3 draft export: the graph against the torch draft built from the checkpoint.

transformers has no EAGLE3 draft, so the reference is :class:`~edgellm_steps.models.eagle3_draft.Eagle3Draft`
(itself held to a forward written independently in the tests); for a quantize-draft checkpoint, that
module with its ModelOpt quantizers restored (fake quantization), held to the precision's criterion.
Two scenarios, as the runtime drives a draft: the first step (the base's three hidden states in, the
draft's own zero) and a later step (the draft's own hidden states of the first step in, the base's zero), each a prefill
of random embeddings of ``tokens`` positions with every row selected; a quantized draft's base
states are drawn within its calibrated range. Pass: the fp16 criterion on the
log-probabilities (the loosest of the precision's formats for a quantized draft), and the same
criterion on the hidden states.
"""

from __future__ import annotations

import copy
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from onnx import helper

from edgellm_steps.artifacts import steps
from edgellm_steps.artifacts.atomic import claim_file
from edgellm_steps.artifacts.draft_weights import open_draft_store
from edgellm_steps.artifacts.manifest import check_step_output
from edgellm_steps.artifacts.sources import read_hf_config, resolve_source
from edgellm_steps.export import llm_io
from edgellm_steps.export.kinds import DRAFT
from edgellm_steps.graph.opsets import ONNX_NAME
from edgellm_steps.models.eagle3_draft import Eagle3Draft
from edgellm_steps.plugins import REFERENCE_OPS
from edgellm_steps.quant.draft_quantizers import fake_quantized_draft
from edgellm_steps.quant.nvfp4 import cpu_fake_quantization
from edgellm_steps.quant.precision import Precision
from edgellm_steps.quant.prequantized import held_precision
from edgellm_steps.verify.parity import compare_logits, judge, tolerance_for
from edgellm_steps.verify.report import conclude, make_report

FC_INPUT_AMAX = "fc.input_quantizer._amax"


def _rope_table(config: dict[str, Any], length: int) -> np.ndarray:
    rot = int(config["head_dim"] * config.get("partial_rotary_factor", 1.0))
    inv_freq = 1.0 / config["rope_theta"] ** (np.arange(rot // 2) * 2 / rot)
    angles = np.arange(length)[:, None] * inv_freq
    return np.concatenate([np.cos(angles), np.sin(angles)], axis=-1)[None].astype(np.float32)


def _run_graph(session: Any, config: dict[str, Any], embeds, hidden_in, from_draft) -> tuple[np.ndarray, np.ndarray]:
    seq = embeds.shape[1]
    past = next(i for i in session.proto_.graph.input if i.name == llm_io.past_name(0))
    cache_dtype = helper.tensor_dtype_to_np_dtype(past.type.tensor_type.elem_type)
    feeds = {
        llm_io.INPUTS_EMBEDS: embeds.astype(np.float16),
        llm_io.past_name(0): np.zeros((1, 2, config["num_key_value_heads"], seq, config["head_dim"]), cache_dtype),
        llm_io.ROPE_COS_SIN: _rope_table(config, seq),
        llm_io.CONTEXT_LENGTHS: np.array([seq], np.int32),
        llm_io.LAST_TOKEN_IDS: np.arange(seq, dtype=np.int64)[None],
        llm_io.KVCACHE_START_INDEX: np.zeros(0, np.int32),
        llm_io.HIDDEN_STATES_INPUT: hidden_in.astype(np.float16),
        llm_io.HIDDEN_STATES_FROM_DRAFT: from_draft.astype(np.float16),
        llm_io.ATTENTION_POS_ID: np.zeros((1, 1), np.int32),  # the runtime's prefill placeholders
        llm_io.ATTENTION_MASK: np.zeros((1, 1, 1), np.int32),
    }
    names = [o.name for o in session.proto_.graph.output]
    result = dict(zip(names, session.run(None, feeds), strict=True))
    return result[llm_io.LOGITS], result[llm_io.HIDDEN_STATES].astype(np.float32)


def verify_draft(
    onnx_dir: str | Path, model_dir: str | Path, *, tokens: int = 7, seed: int = 0, report: str | Path | None = None
) -> dict[str, Any]:
    """Compare the draft export with the draft checkpoint; write ``report`` if given; raise ParityError on a miss."""
    import torch
    from onnx.reference import ReferenceEvaluator

    claim = claim_file(Path(report)) if report is not None else None
    onnx_dir = Path(onnx_dir)
    check_step_output(onnx_dir, steps.EXPORT_DRAFT)
    checkpoint = resolve_source(str(model_dir), allow_download=True)
    draft_config = read_hf_config(checkpoint)
    held = held_precision(checkpoint, draft_config)
    store = open_draft_store(checkpoint)
    if held is None:
        model, precision = Eagle3Draft.from_store(draft_config, store), Precision("fp16")
    else:
        model, precision = fake_quantized_draft(checkpoint, draft_config, store), held.precision
    config = json.loads((onnx_dir / "config.json").read_text())
    session = ReferenceEvaluator(str(onnx_dir / ONNX_NAME), new_ops=list(REFERENCE_OPS))
    width, target = config["hidden_size"], config["base_model_hidden_size"]
    rng = np.random.default_rng(seed)
    # Base hidden states within the calibrated range of fc's input (a quantized draft clamps beyond it).
    scale = float(store.get(FC_INPUT_AMAX).float().max()) / 4 if FC_INPUT_AMAX in store else 1.0
    embeds = (rng.standard_normal((1, tokens, width)) * 0.5).astype(np.float16)
    hidden_in = (rng.standard_normal((1, tokens, target)) * scale).astype(np.float16)
    from_draft = np.zeros((1, tokens, width), np.float16)
    results, floors = {}, {}
    # The draft in float16, the graph's precision: the reference's own noise floor on the same inputs.
    half = copy.deepcopy(model).to(torch.float16)
    for scenario in ("first_step", "later_step"):
        logits, hidden = _run_graph(session, config, embeds, hidden_in, from_draft)
        with torch.no_grad(), cpu_fake_quantization():
            ref_logits, ref_hidden = model(
                *(torch.from_numpy(a.astype(np.float32)) for a in (embeds, hidden_in, from_draft))
            )
            half_logits, half_hidden = (
                t.float().numpy() for t in half(*(torch.from_numpy(a) for a in (embeds, hidden_in, from_draft)))
            )
        results[scenario] = compare_logits(logits, ref_logits.numpy())
        results[f"{scenario}_hidden_states"] = compare_logits(hidden, ref_hidden.numpy())
        floors[scenario] = compare_logits(half_logits, ref_logits.numpy())
        floors[f"{scenario}_hidden_states"] = compare_logits(half_hidden, ref_hidden.numpy())
        # The later step reads the draft's own states of the first step, the base's zero, new tokens.
        embeds = (rng.standard_normal((1, tokens, width)) * 0.5).astype(np.float16)
        hidden_in, from_draft = np.zeros_like(hidden_in), ref_hidden.numpy().astype(np.float16)
    chosen = tolerance_for(precision.formats())
    tolerance = replace(chosen, greedy=False)
    summary = make_report(
        kind=DRAFT.model_type,
        onnx_dir=onnx_dir,
        model_dir=model_dir,
        precision=precision,
        tolerance=tolerance,
        inputs={"tokens": tokens, "seed": seed},
        results=results,
        floors=floors,
    )
    bounds = {case: judge(tolerance, floor) for case, floor in floors.items()}
    return conclude(summary, results, bounds, claim, f"{onnx_dir} does not match the draft {model_dir}")
