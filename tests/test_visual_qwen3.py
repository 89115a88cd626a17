"""export-visual and verify-onnx for the Qwen3-VL vision tower (contract 7.2) against transformers' own tower.

Two towers: the tiny random checkpoint, and a copy rescaled to look trained (below), because in the
random one the learned positions (std 0.02 against patch embeddings of std 0.8) and the blocks'
residual updates are too small to matter: there, nearest sampling moves the output by 1.8% and
deepstack features taken one block late by under 1%, both inside verify-onnx's 3% fp16 bound, so
neither negative control could fail. Rescaled, the fp16 graph stays at 0.1% and those controls
measure 46-66% and 10-12%.

The runtime-input tests hold the library's position taps, rotary angles and masks EQUAL to
transformers' helpers that Qwen3VLVisionModel.forward calls (transformers 5 computes the grid
sampling in ``vision_utils.get_vision_interpolation_indices_and_weights``; the 4.x
``fast_pos_embed_interpolate`` / ``rot_pos_emb`` methods are gone).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from edgellm_steps.artifacts import steps
from edgellm_steps.artifacts.manifest import write_manifest
from edgellm_steps.errors import ParityError, SourceError
from edgellm_steps.export import visual_io as io
from edgellm_steps.export.export_visual import export_visual
from edgellm_steps.export.visual_graph_qwen3 import Qwen3VisualGraph
from edgellm_steps.graph.onnx_builder import write_graph
from edgellm_steps.models.vision_geometry import open_vision_tower
from edgellm_steps.models.vision_tower import load_vision_tower
from edgellm_steps.verify.parity import TOLERANCES, compare_logits
from edgellm_steps.verify.verify_visual import tower_outputs, verify_visual
from edgellm_steps.verify.visual_inputs import block_mask, position_taps, rotary_angles, visual_feeds

from .support import rescaled_copy

#: Images of different sizes: smaller than the 4 x 4 grid, equal to it, larger, wide, and a 2-frame video.
GRIDS = [(1, 2, 2), (1, 4, 4), (1, 8, 12), (1, 12, 20), (2, 4, 8)]
#: The two-image scenario the ONNX controls run (block-diagonal mask, different sizes).
TWO_IMAGES = [(1, 8, 12), (1, 12, 20)]
#: Measured 0.06-0.10% of max |output| on both towers (fp16 arithmetic); a wrong graph is >= 10%.
FP16_BOUND = 3e-3


@pytest.fixture(scope="module")
def towers(checkpoint_factory, tmp_path_factory):
    """``towers(name)`` -> (checkpoint, fp16 export dir) for ``tiny`` or ``trained_like``, made once."""
    done: dict[str, tuple[Path, Path]] = {}

    def get(name: str) -> tuple[Path, Path]:
        if name not in done:
            root = tmp_path_factory.mktemp(f"qwen3-visual-{name}")
            checkpoint = checkpoint_factory("qwen3_vl")
            if name == "trained_like":
                checkpoint = rescaled_copy(checkpoint, root / "ckpt")
            export_visual(checkpoint, root / "visual")
            done[name] = (checkpoint, root / "visual")
        return done[name]

    return get


@pytest.fixture(scope="module")
def hf_tower(checkpoint_factory):
    opened = open_vision_tower(checkpoint_factory("qwen3_vl"))
    return opened, load_vision_tower(opened.checkpoint, opened.spec, opened.store, opened.prefix)


def test_position_taps_equal_the_transformers_helper(hf_tower):
    """Bilinear corner rows and weights, merge-block order, as Qwen3VLVisionModel.forward samples its grid."""
    from transformers.vision_utils import get_vision_interpolation_indices_and_weights

    opened, tower = hf_tower
    indices, weights = get_vision_interpolation_indices_and_weights(
        torch.tensor(GRIDS),
        num_grid_per_side=tower.num_grid_per_side,
        mode=tower.interpolation_mode,
        align_corners=tower.interpolation_align_corners,
        spatial_merge_size=tower.config.spatial_merge_size,
    )
    ours_index, ours_weight = position_taps(GRIDS, opened.dims)
    assert ours_index.shape == (io.POSITION_TAPS, sum(t * h * w for t, h, w in GRIDS))
    np.testing.assert_array_equal(ours_index, indices.numpy().T)
    # Equal to float32 rounding (transformers forms the ceil weight as 1 - (1 - frac), 1 ulp from frac).
    np.testing.assert_allclose(ours_weight, weights.numpy().T, rtol=1e-6, atol=1e-7)
    feeds = visual_feeds(np.zeros((ours_index.shape[1], opened.dims.patch_dim)), GRIDS, opened.dims, windowed=False)
    np.testing.assert_allclose(feeds[io.FAST_POS_EMBED_WEIGHT], weights.numpy().T.astype(np.float16), rtol=1e-3)
    # Negative control: nearest sampling is a different table (so the equality above has teeth).
    _, near_weight = position_taps(GRIDS, opened.dims, mode="nearest")
    assert not np.allclose(near_weight, weights.numpy().T, rtol=1e-6, atol=1e-7)


def test_rotary_angles_and_masks_equal_the_transformers_helpers(hf_tower):
    """Axial angles (h slots then w slots, theta 10000) and per-frame block-diagonal masks."""
    from transformers.vision_utils import get_vision_cu_seqlens, get_vision_position_ids

    opened, tower = hf_tower
    grid_thw = torch.tensor(GRIDS)
    positions = get_vision_position_ids(grid_thw, tower.config.spatial_merge_size)
    ours = rotary_angles(GRIDS, opened.dims)
    theirs = torch.cat(
        [positions[:, :1] * tower.rotary_pos_emb.inv_freq, positions[:, 1:] * tower.rotary_pos_emb.inv_freq], 1
    )
    np.testing.assert_allclose(ours, theirs.numpy(), rtol=1e-6)  # float64 angles rounded once vs float32 products
    # The cos / sin transformers applies are those of the angles repeated over both head halves, as the graph does.
    cos, sin = tower.rotary_pos_emb(torch.zeros(1), positions)
    doubled = np.concatenate([ours, ours], axis=1)
    np.testing.assert_allclose(np.cos(doubled), cos.numpy(), atol=1e-6)
    np.testing.assert_allclose(np.sin(doubled), sin.numpy(), atol=1e-6)
    # Negative control: w slots first is not what transformers computes.
    half = ours.shape[1] // 2
    assert not np.allclose(np.concatenate([ours[:, half:], ours[:, :half]], 1), theirs.numpy())
    bounds = get_vision_cu_seqlens(grid_thw).tolist()
    expected = np.full((1, bounds[-1], bounds[-1]), np.finfo(np.float16).min, dtype=np.float16)
    for start, end in itertools.pairwise(bounds):
        expected[0, start:end, start:end] = 0
    np.testing.assert_array_equal(block_mask([h * w for t, h, w in GRIDS for _ in range(t)]), expected)


def test_visual_export_directory(towers):
    checkpoint, export_dir = towers("tiny")
    assert {p.name for p in export_dir.iterdir()} == {
        "model.onnx",
        "onnx_model.data",
        "config.json",
        "preprocessor_config.json",
        "manifest.json",
    }
    config = json.loads((export_dir / "config.json").read_text())
    source = json.loads((checkpoint / "config.json").read_text())
    assert {k: config[k] for k in source} == source and config["edgellm_version"] == "0.5.0"
    # What the runtime reads: the deepstack count and the position grid.
    assert config["vision_config"]["deepstack_visual_indexes"] == [0, 1, 3]
    assert config["vision_config"]["num_position_embeddings"] == 16
    graph = onnx.load(str(export_dir / "model.onnx"), load_external_data=False).graph

    def described(values):
        return [
            (v.name, v.type.tensor_type.elem_type, [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim])
            for v in values
        ]

    f16, f32, i64 = onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT, onnx.TensorProto.INT64
    assert described(graph.input) == [
        (io.INPUT, f16, [io.HW, 3 * 2 * 16 * 16]),
        (io.ROTARY_POS_EMB, f32, [io.HW, 8]),
        (io.ATTENTION_MASK, f16, [1, io.HW, io.HW]),
        (io.FAST_POS_EMBED_IDX, i64, [4, io.HW]),
        (io.FAST_POS_EMBED_WEIGHT, f16, [4, io.HW]),
    ]
    outputs = [io.OUTPUT, "deepstack_features_0", "deepstack_features_1", "deepstack_features_2"]
    assert described(graph.output) == [(name, f16, [io.IMAGE_TOKENS, 64]) for name in outputs]


@pytest.mark.parametrize("tower", ["tiny", "trained_like"])
def test_verify_onnx_passes_on_one_and_two_images(towers, tower):
    checkpoint, export_dir = towers(tower)
    report = verify_visual(export_dir, checkpoint)
    cases = report["cases"]
    outputs = ["", "/deepstack_features_0", "/deepstack_features_1", "/deepstack_features_2"]
    assert sorted(cases) == sorted(f"{s}{o}" for s in ("one_image", "two_images") for o in outputs)
    worst = max(case["relative_error"] for case in cases.values())
    assert report["passed"] and worst < FP16_BOUND, f"{tower}: worst {worst:.2e} of max |reference|"


def trained_like_run(towers, feeds_mode: str):
    """The trained-like fp16 graph on two images fed with ``feeds_mode`` position sampling, against the tower."""
    checkpoint, export_dir = towers("trained_like")
    opened = open_vision_tower(checkpoint)
    tower = load_vision_tower(checkpoint, opened.spec, opened.store, opened.prefix)
    rows = sum(t * h * w for t, h, w in TWO_IMAGES)
    patches = np.random.default_rng(0).standard_normal((rows, opened.dims.patch_dim)).astype(np.float32)
    expected = tower_outputs(tower, patches, TWO_IMAGES, opened.dims)
    session = ort.InferenceSession(str(export_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    feeds = visual_feeds(patches, TWO_IMAGES, opened.dims, windowed=False, position_mode=feeds_mode)
    got = session.run(list(expected), feeds)
    return {name: compare_logits(g.astype(np.float32), expected[name]) for name, g in zip(expected, got, strict=True)}


def test_nearest_position_sampling_fails_verification(towers):
    """Negative control: the right graph fed nearest-neighbour positions misses on every output."""
    tolerance = TOLERANCES["fp16"]
    assert all(r.relative_error < FP16_BOUND for r in trained_like_run(towers, "bilinear").values())
    nearest = trained_like_run(towers, "nearest")
    assert all(r.relative_error > 10 * tolerance.rel_tol for r in nearest.values()), nearest


def test_deepstack_after_the_wrong_block_fails_verification(towers, tmp_path):
    """Negative control: mergers 0 and 1 one block late (blocks 1, 2) fail on their outputs; merger 2 stays right."""
    checkpoint, export_dir = towers("trained_like")
    opened = open_vision_tower(checkpoint)
    late = dataclasses.replace(opened.dims, deepstack_indexes=(1, 2, 3))
    wrong = tmp_path / "visual"
    wrong.mkdir()
    write_graph(wrong, lambda b: Qwen3VisualGraph(b, opened.store, opened.spec, late, opened.prefix).build())
    shutil.copy(export_dir / "config.json", wrong)
    write_manifest(wrong, step=steps.EXPORT_VISUAL, parameters={"precision": "fp16"})
    with pytest.raises(ParityError) as failed:
        verify_visual(wrong, checkpoint)
    message = str(failed.value)
    assert "\n" not in message
    for scenario in ("one_image", "two_images"):
        assert f"{scenario}/deepstack_features_0 (" in message and f"{scenario}/deepstack_features_1 (" in message
        assert f"{scenario}/deepstack_features_2 (" not in message and f"{scenario} (" not in message


def test_fp8_tower_verifies(checkpoint_factory, towers, tmp_path):
    """ModelOpt fp8 on every Linear (patch embedding float): verify-onnx against the fake-quantized tower."""
    checkpoint = checkpoint_factory("qwen3_vl")
    export_visual(checkpoint, tmp_path / "fp8", quantization="fp8")
    report = verify_visual(tmp_path / "fp8", checkpoint)
    assert report["passed"] and report["precision"] == "fp8"
    graph = onnx.load(str(tmp_path / "fp8" / "model.onnx"), load_external_data=False).graph
    quantized = {n.name for n in graph.node if n.op_type == "QuantizeLinear"}
    assert quantized and not any("patch_embed" in name for name in quantized)


@pytest.mark.parametrize(
    ("key", "value", "complaint"),
    [
        ("deepstack_visual_indexes", [3, 0, 1], "in ascending order"),
        ("deepstack_visual_indexes", [0, 1, 4], "distinct blocks of the 4-block tower"),
        ("num_position_embeddings", 15, "is not a square grid"),
    ],
)
def test_unusable_qwen3_tower_is_refused(checkpoint_factory, tmp_path, key, value, complaint):
    source = checkpoint_factory("qwen3_vl")
    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    for path in source.iterdir():
        (checkpoint / path.name).symlink_to(path)
    config = json.loads((source / "config.json").read_text())
    config["vision_config"][key] = value
    (checkpoint / "config.json").unlink()
    (checkpoint / "config.json").write_text(json.dumps(config))
    with pytest.raises(SourceError, match=complaint) as refused:
        export_visual(checkpoint, tmp_path / "visual")
    assert "\n" not in str(refused.value) and not (tmp_path / "visual").exists()
