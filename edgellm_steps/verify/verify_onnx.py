"""verify-onnx: prove an LLM export computes what its checkpoint computes.

(A vision encoder export is handed to :mod:`edgellm_steps.verify.verify_visual`, an EAGLE3
draft export to :mod:`edgellm_steps.verify.verify_draft`.)

Runs the exported graph on the CPU (``onnx.reference`` plus our plugin
implementations) the way the runtime drives it, and transformers on the same
random tokens, over three scenarios:

- ``prefill_decode``: a prefill of ``prefill`` tokens, then ``decode`` single-token steps;
- ``chunked_prefill``: the same prompt prefilled in two chunks through the KV cache;
- ``ragged_batch``: two sequences of different lengths in one batch, prefill then decode.

Each scenario's reference rows are also computed by the reference in float16, the graph's
precision: that is the reference's own noise floor on these very inputs, and the scenario passes
when the export's error is within ``parity.FLOOR_MARGIN`` x that floor, never held tighter than the
format's base bound (fp16 and weight-only int4: max |logit error| <= 3e-2 x max |logit|, min cosine
>= 0.999, identical greedy tokens) nor allowed past its ceiling (``parity.TOLERANCES``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from edgellm_steps.artifacts import steps
from edgellm_steps.artifacts.atomic import claim_file
from edgellm_steps.artifacts.checkpoint import TensorStore
from edgellm_steps.artifacts.manifest import check_if_step_output, check_step_output
from edgellm_steps.artifacts.sources import resolve_source
from edgellm_steps.errors import ParityError
from edgellm_steps.graph.onnx_builder import ONNX_NAME
from edgellm_steps.lora.adapter_fit import read_fitting_adapter
from edgellm_steps.lora.insert_lora import check_lora_graph
from edgellm_steps.lora.process_lora import processed_tensors
from edgellm_steps.models.families import family_for
from edgellm_steps.quant.checkpoint_record import open_checkpoint
from edgellm_steps.quant.nvfp4 import cpu_fake_quantization
from edgellm_steps.verify.parity import compare_logits, hf_rope_table, judge, tolerance_for
from edgellm_steps.verify.reference import LLMRunner
from edgellm_steps.verify.reference_models import load_reference_model
from edgellm_steps.verify.report import conclude, make_report
from edgellm_steps.verify.verify_draft import verify_draft
from edgellm_steps.verify.verify_visual import verify_visual

log = logging.getLogger(__name__)


def _hf_logits(model, ids: list[int]) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


#: What a scenario compares: the export's logit rows, and for each row the (token sequence, position)
#: of the reference logit it must match. Any model's rows follow from that (:func:`_reference_rows`),
#: so the float16 reference of the noise floor is asked exactly what the export was.
Wanted = list[tuple[tuple[int, ...], int]]


def _prefill_decode(runner_for, ids: list[int], prefill: int) -> tuple[np.ndarray, Wanted]:
    runner = runner_for(1)
    got = [runner.step([ids[:prefill]], all_logits=True)[0]]
    got += [runner.step([[token]])[0] for token in ids[prefill:]]
    return np.concatenate(got), [(tuple(ids), k) for k in range(len(ids))]


def _chunked_prefill(runner_for, ids: list[int], prefill: int) -> tuple[np.ndarray, Wanted]:
    runner = runner_for(1)
    split = prefill // 2
    got = [runner.step([ids[:split]], all_logits=True)[0], runner.step([ids[split:prefill]], all_logits=True)[0]]
    return np.concatenate(got), [(tuple(ids), k) for k in range(prefill)]


def _ragged_batch(runner_for, ids: list[int], prefill: int, decode: int) -> tuple[np.ndarray, Wanted]:
    runner = runner_for(2)
    short = max(1, prefill - 3)
    seqs = [ids, ids[prefill - short : prefill] + ids[prefill:]]
    prompt = [prefill, short]
    steps = [runner.step([s[:n] for s, n in zip(seqs, prompt, strict=True)])]
    steps += [runner.step([[s[n + k]] for s, n in zip(seqs, prompt, strict=True)]) for k in range(decode)]
    got, wanted = [], []
    for b, (seq, n) in enumerate(zip(seqs, prompt, strict=True)):
        got += [step[b, 0] for step in steps]
        wanted += [(tuple(seq), n - 1 + k) for k in range(decode + 1)]
    return np.stack(got), wanted


def _reference_rows(logits_of, wanted: Wanted) -> np.ndarray:
    """The reference's logit rows for ``wanted``: one forward pass per distinct sequence (the model is causal)."""
    forwards: dict[tuple[int, ...], np.ndarray] = {}
    for seq, _ in wanted:
        if seq not in forwards:
            forwards[seq] = logits_of(list(seq))
    return np.stack([forwards[seq][position] for seq, position in wanted])


def _kept_columns(onnx_dir: Path) -> Any:
    """The vocabulary columns an export's logits hold: all, or a reduced vocabulary's ``vocab_map``."""
    if "reduced_vocab_size" not in json.loads((onnx_dir / "config.json").read_text()):
        return slice(None)
    from safetensors.numpy import load_file

    return load_file(str(onnx_dir / "vocab_map.safetensors"))["vocab_map"].astype(np.int64)


def _text_token_ids(hf_config: dict[str, Any], vocab_size: int, count: int, seed: int) -> list[int]:
    """Random token ids; for a VLM none of the image / video / vision markers (the parity is text-only)."""
    rng = np.random.default_rng(seed)
    if not family_for(hf_config).vision_language:
        return rng.integers(0, vocab_size, count).tolist()
    markers = [v for k, v in hf_config.items() if k.endswith("_token_id") and isinstance(v, int)]
    allowed = np.setdiff1d(np.arange(vocab_size), markers)
    return allowed[rng.integers(0, len(allowed), count)].tolist()


def _with_adapter(lora_graph: Path, model, adapter: str | Path, hf_config: dict, where: str):
    """(graph file name, LoRA feeds, reference model with the PEFT adapter applied) for verifying an adapter.

    ``lora_graph`` comes from :func:`check_lora_graph`, called before the reference model loads: a LoRA
    graph made from another ``model.onnx`` than the export's is refused in one line, as build-engine does.
    """
    import peft

    directory = resolve_source(str(adapter), allow_download=True)
    tensors = processed_tensors(read_fitting_adapter(directory, hf_config, where)[1])
    lora = {name: tensor.numpy() for name, tensor in tensors.items()}
    # PEFT loads the adapter as data: safetensors only (read_adapter refused anything else).
    return lora_graph.name, lora, peft.PeftModel.from_pretrained(model, str(directory)).eval()


def verify_onnx(
    onnx_dir: str | Path,
    model_dir: str | Path,
    *,
    prefill: int = 7,
    decode: int = 3,
    seed: int = 0,
    report: str | Path | None = None,
    adapter: str | Path | None = None,
) -> dict[str, Any]:
    """Run the parity scenarios; write ``report`` (JSON) if given; raise :class:`ParityError` on a miss.

    With ``adapter`` (a PEFT LoRA adapter) the export's ``lora_model.onnx`` runs fed with the processed
    adapter, against the reference model with PEFT's adapter applied.
    """
    import torch

    if check_if_step_output(Path(onnx_dir), steps.EXPORT_VISUAL) is not None:
        return verify_visual(onnx_dir, model_dir, seed=seed, report=report)
    if check_if_step_output(Path(onnx_dir), steps.EXPORT_DRAFT) is not None:
        return verify_draft(onnx_dir, model_dir, tokens=prefill, seed=seed, report=report)
    if prefill < 2 or decode < 1:
        raise ParityError("verify needs --prefill >= 2 and --decode >= 1")
    claim = claim_file(Path(report)) if report is not None else None
    check_step_output(Path(onnx_dir), steps.EXPORT_LLM)
    lora_graph = check_lora_graph(Path(onnx_dir)) if adapter is not None else None  # before the model loads
    # A quantize-llm output must be complete (its manifest checked) before it is read.
    source = resolve_source(str(model_dir), allow_download=True)
    check_if_step_output(source, steps.QUANTIZE_LLM)
    opened = open_checkpoint(source)
    checkpoint, hf_config, held, precision = opened.path, opened.hf_config, opened.held, opened.precision
    TensorStore(checkpoint)  # every shard header checked before transformers reads them
    tolerance = tolerance_for(precision.formats())

    model = load_reference_model(checkpoint, held, torch.float32)
    graph, lora = ONNX_NAME, None
    if adapter is not None and lora_graph is not None:
        graph, lora, model = _with_adapter(lora_graph, model, adapter, hf_config, str(checkpoint))
    capacity = prefill + decode + 1
    rope = hf_rope_table(model.get_base_model() if adapter is not None else model, capacity)  # PEFT wraps it

    def runner_for(batch: int) -> LLMRunner:
        """The export's graph (or its LoRA graph, whose inserted nodes insert-lora names and places in their
        layer), one decoder layer's weights in memory at a time: bit for bit the whole graph's outputs."""
        return LLMRunner(Path(onnx_dir), rope, batch=batch, capacity=capacity, graph=graph, lora=lora, streamed=True)

    kept = _kept_columns(Path(onnx_dir))

    def logits_of(model):
        """The model's logits over the export's vocabulary (a reduced one keeps its vocab_map's columns)."""
        return lambda tokens: _hf_logits(model, tokens)[..., kept]

    ids = _text_token_ids(hf_config, model.config.get_text_config().vocab_size, prefill + decode, seed)
    with cpu_fake_quantization():
        cases = {
            "prefill_decode": _prefill_decode(runner_for, ids, prefill),
            "chunked_prefill": _chunked_prefill(runner_for, ids, prefill),
            "ragged_batch": _ragged_batch(runner_for, ids, prefill, decode),
        }
        want = {name: _reference_rows(logits_of(model), wanted) for name, (_, wanted) in cases.items()}
        # The same reference in float16 (cast in place: one model in memory, no second load): its own noise floor.
        model.to(torch.float16)
        floors = {
            name: compare_logits(_reference_rows(logits_of(model), wanted), want[name])
            for name, (_, wanted) in cases.items()
        }
    results = {name: compare_logits(got, want[name]) for name, (got, _) in cases.items()}
    bounds = {name: judge(tolerance, floor) for name, floor in floors.items()}
    for name, result in results.items():
        verdict = "pass" if result.passed(bounds[name]) else "FAIL"
        log.info("%s: %s; reference floor %s -> %s", name, result, floors[name], verdict)
    summary = make_report(
        kind=json.loads((Path(onnx_dir) / "config.json").read_text()).get("model_type", "llm"),
        onnx_dir=onnx_dir,
        model_dir=model_dir,
        precision=precision,
        tolerance=tolerance,
        inputs={"prefill": prefill, "decode": decode, "seed": seed},
        results=results,
        adapter=adapter,
        floors=floors,
    )
    return conclude(summary, results, bounds, claim, f"{onnx_dir} does not match {model_dir}")
