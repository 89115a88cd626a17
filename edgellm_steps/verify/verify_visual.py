"""verify-onnx for a vision encoder export: the graph against the checkpoint's transformers vision tower.

The graph runs on the CPU (``onnx.reference``, as for LLM exports), fed as the runtime feeds it
(:func:`~edgellm_steps.verify.visual_inputs.visual_feeds`); the reference is the tower
alone, in float32, on the same random patches. Two scenarios: one image, and two images
of different sizes packed together (block-diagonal attention, windows that do not tile
the second image evenly).

Pass: max |error| <= ``rel_tol`` x max |reference| and every output row's cosine >=
``min_cosine``: the fp16 criterion of LLM exports for an fp16 tower; for an fp8 tower the
fp8 criterion, against ModelOpt's fake-quantized tower calibrated on the same generated
images (measured 2.8-3.7% of max |output| on the tiny test towers; the fake-quantized tower
itself moves 1.8-2.4% between float16 and float32).

A Qwen3-VL tower answers with ``output`` and every ``deepstack_features_k``; each is compared
(result ``<scenario>/<output>``), so a deepstack merger on the wrong block fails on its own row.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from edgellm_steps.artifacts import steps
from edgellm_steps.artifacts.atomic import claim_file
from edgellm_steps.artifacts.manifest import check_step_output
from edgellm_steps.artifacts.sources import resolve_source
from edgellm_steps.export.kinds import VISUAL
from edgellm_steps.export.visual_io import INPUT, OUTPUT, deepstack_names
from edgellm_steps.graph.opsets import ONNX_NAME
from edgellm_steps.models.tile_geometry import TileDims
from edgellm_steps.models.vision_geometry import Grid, VisionDims, open_vision_tower
from edgellm_steps.models.vision_tower import load_tile_features, load_vision_tower
from edgellm_steps.quant.visual_calibration import calibrated_tower
from edgellm_steps.verify.parity import TOLERANCES, ParityResult, Tolerance, compare_logits, judge
from edgellm_steps.verify.report import conclude, make_report
from edgellm_steps.verify.visual_inputs import visual_feeds

log = logging.getLogger(__name__)

#: (t, h, w) patch grids per scenario, in patches (multiples of the 2 x 2 merge).
SCENARIOS = {"one_image": [(1, 16, 16)], "two_images": [(1, 8, 12), (1, 12, 20)]}


def _tolerance(precision: str) -> Tolerance:
    return replace(TOLERANCES["fp8" if precision == "fp8" else "fp16"], greedy=False)


def tower_outputs(tower: Any, patches: np.ndarray, grids: list[Grid], dims: VisionDims) -> dict[str, np.ndarray]:
    """The transformers tower's answer for ``patches``, by graph output name (``output``, then deepstack)."""
    import torch

    with torch.no_grad():
        answer = tower(torch.from_numpy(patches), grid_thw=torch.tensor(grids))
    outputs = {OUTPUT: answer.pooler_output.numpy()}
    names = deepstack_names(dims)
    if names:
        features = answer.deepstack_features
        outputs.update({name: feature.numpy() for name, feature in zip(names, features, strict=True)})
    return outputs


#: Tiles per scenario of a tiled tower: one tile, and two images together (a tile and its thumbnail, one tile).
TILE_SCENARIOS = {"one_tile": 1, "two_images": 3}

#: (scenario, what the report records of its input, graph feeds, reference outputs in float32, in float16).
Case = tuple[str, dict[str, Any], dict[str, np.ndarray], dict[str, np.ndarray], dict[str, np.ndarray]]


def _patch_cases(tower: Any, half: Any, dims: VisionDims, windowed: bool, rng: np.random.Generator) -> Iterator[Case]:
    """Qwen-VL towers: random patches of one image, and of two images of different sizes packed together."""
    for name, grids in SCENARIOS.items():
        patches = rng.standard_normal((sum(t * h * w for t, h, w in grids), dims.patch_dim)).astype(np.float32)
        expected = tower_outputs(tower, patches, grids, dims)
        expected_half = tower_outputs(half, patches.astype(np.float16), grids, dims)
        yield name, {"grids": grids}, visual_feeds(patches, grids, dims, windowed=windowed), expected, expected_half


def _tile_cases(features: Any, half: Any, dims: TileDims, rng: np.random.Generator) -> Iterator[Case]:
    """Tiled towers: random normalized tiles, each answered by transformers' ``get_image_features``."""
    import torch

    for name, blocks in TILE_SCENARIOS.items():
        tiles = rng.standard_normal((blocks, dims.in_channels, dims.image_size, dims.image_size)).astype(np.float32)
        with torch.no_grad():
            expected = {OUTPUT: features(torch.from_numpy(tiles)).numpy()}
            expected_half = {OUTPUT: half(torch.from_numpy(tiles).half()).float().numpy()}
        yield name, {"blocks": blocks}, {INPUT: tiles.astype(np.float16)}, expected, expected_half


def verify_visual(
    onnx_dir: str | Path, model_dir: str | Path, *, seed: int = 0, report: str | Path | None = None
) -> dict[str, Any]:
    """Compare the vision export with the tower; write ``report`` (JSON) if given; raise ParityError on a miss."""
    import torch
    from onnx.reference import ReferenceEvaluator

    claim = claim_file(Path(report)) if report is not None else None
    onnx_dir = Path(onnx_dir)
    manifest = check_step_output(onnx_dir, steps.EXPORT_VISUAL)
    precision = manifest["parameters"]["precision"]
    checkpoint = resolve_source(str(model_dir), allow_download=True)
    opened = open_vision_tower(checkpoint)
    spec, dims = opened.spec, opened.dims
    if precision == "fp8":
        # As for LLM exports, a quantized graph answers to ModelOpt's fake-quantized model, calibrated as it was.
        tower = calibrated_tower(opened)
    elif spec.tiled:
        tower = load_tile_features(opened)
    else:
        tower = load_vision_tower(checkpoint, spec, opened.store, opened.prefix)
    session = ReferenceEvaluator(str(onnx_dir / ONNX_NAME))
    tolerance = _tolerance(precision)
    rng = np.random.default_rng(seed)
    results: dict[str, ParityResult] = {}
    floors: dict[str, ParityResult] = {}
    case_inputs: dict[str, dict[str, Any]] = {}
    # The tower in float16, the graph's precision: the reference's own noise floor on the same inputs.
    half = copy.deepcopy(tower).to(torch.float16)
    if spec.tiled:
        cases = _tile_cases(tower, half, dims, rng)
    else:
        cases = _patch_cases(tower, half, dims, spec.window_attention, rng)
    for name, inputs, feeds, expected, expected_half in cases:
        got = session.run(list(expected), feeds)
        for output, answer in zip(expected, got, strict=True):
            case = name if output == OUTPUT else f"{name}/{output}"
            results[case] = compare_logits(answer.astype(np.float32), expected[output])
            floors[case] = compare_logits(expected_half[output].astype(np.float32), expected[output])
            case_inputs[case] = inputs
            verdict = "pass" if results[case].passed(judge(tolerance, floors[case])) else "FAIL"
            log.info("%s: %s; reference floor %s -> %s", case, results[case], floors[case], verdict)
    summary = make_report(
        kind=VISUAL.name,
        onnx_dir=onnx_dir,
        model_dir=model_dir,
        precision=precision,
        tolerance=tolerance,
        inputs={"seed": seed},
        results=results,
        case_inputs=case_inputs,
        floors=floors,
    )
    bounds = {case: judge(tolerance, floor) for case, floor in floors.items()}
    return conclude(summary, results, bounds, claim, f"{onnx_dir} does not match the vision tower of {model_dir}")
