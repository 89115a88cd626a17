"""export-visual: the vision-encoder graph of Qwen2-VL / Qwen2.5-VL against the transformers vision tower.

The graph's inputs are built here from transformers' own vision helpers (position ids,
cumulative sequence lengths, window index), not from the library's runtime-input code;
a separate test checks that code against the same helpers.
"""

from __future__ import annotations

import itertools
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from edgellm_steps.errors import PrecisionError, SourceError
from edgellm_steps.export import visual_io as io
from edgellm_steps.export.export_visual import export_visual
from edgellm_steps.models.families import family_for
from edgellm_steps.models.vision_geometry import load_vision_dims, patchify
from edgellm_steps.verify.visual_inputs import visual_feeds

VLM_CASES = ("qwen2_vl", "qwen2_5_vl")
#: (t, h, w) patch grids: one image, and two images of different sizes (one not a whole number of windows).
GRIDS = {"one-image": [(1, 8, 8)], "two-images": [(1, 4, 8), (1, 12, 8)]}


@pytest.fixture(scope="module")
def visual_export(checkpoint_factory, tmp_path_factory):
    done = {}

    def export(case: str):
        if case not in done:
            out = tmp_path_factory.mktemp(f"visual-{case}") / "visual"
            export_visual(checkpoint_factory(case), out)
            done[case] = out
        return done[case]

    return export


def hf_model(checkpoint):
    import transformers

    return transformers.AutoModelForImageTextToText.from_pretrained(str(checkpoint), dtype=torch.float32).eval()


def hf_feeds(tower, grids, patches: np.ndarray) -> dict[str, np.ndarray]:
    """The graph's inputs, from transformers' vision helpers and the tower's own inverse frequencies."""
    from transformers.vision_utils import get_vision_cu_seqlens, get_vision_position_ids, get_vision_window_index

    grid_thw = torch.tensor(grids)
    merge = tower.config.spatial_merge_size
    positions = get_vision_position_ids(grid_thw, merge).float()  # [hw, 2]: row, column
    inv_freq = tower.rotary_pos_emb.inv_freq.float()
    angles = torch.cat([positions[:, :1] * inv_freq, positions[:, 1:] * inv_freq], dim=1)

    def mask(cu_seqlens) -> np.ndarray:
        bounds = cu_seqlens.tolist()
        total = bounds[-1]
        out = np.full((1, total, total), np.finfo(np.float16).min, dtype=np.float16)
        for start, end in itertools.pairwise(bounds):
            out[0, start:end, start:end] = 0
        return out

    feeds = {
        io.INPUT: patches.astype(np.float16),
        io.ROTARY_POS_EMB: angles.numpy(),
        io.ATTENTION_MASK: mask(get_vision_cu_seqlens(grid_thw)),
    }
    if hasattr(tower, "window_size"):
        index, cu_window = get_vision_window_index(
            grid_thw, spatial_merge_size=merge, window_size=tower.window_size, patch_size=tower.patch_size
        )
        feeds[io.WINDOW_ATTENTION_MASK] = mask(cu_window)
        feeds[io.WINDOW_INDEX] = index.numpy().astype(np.int64)
        feeds[io.REVERSE_WINDOW_INDEX] = torch.argsort(index).numpy().astype(np.int64)
    return feeds


def random_patches(grids, patch_dim: int, seed: int = 0) -> np.ndarray:
    rows = sum(t * h * w for t, h, w in grids)
    return np.random.default_rng(seed).standard_normal((rows, patch_dim)).astype(np.float32)


def run_graph(export_dir, feeds) -> np.ndarray:
    session = ort.InferenceSession(str(export_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    assert names == set(feeds), f"graph inputs {sorted(names)} vs fed {sorted(feeds)}"
    return session.run([io.OUTPUT], feeds)[0]


@pytest.mark.parametrize("grids", sorted(GRIDS))
@pytest.mark.parametrize("case", VLM_CASES)
def test_visual_graph_matches_the_hf_vision_tower(checkpoint_factory, visual_export, case, grids):
    checkpoint, export_dir = checkpoint_factory(case), visual_export(case)
    grid = GRIDS[grids]
    tower = hf_model(checkpoint).model.visual
    patches = random_patches(grid, tower.patch_embed.proj.weight[0].numel())
    with torch.no_grad():
        expected = tower(torch.from_numpy(patches), grid_thw=torch.tensor(grid)).pooler_output.numpy()
    got = run_graph(export_dir, hf_feeds(tower, grid, patches)).astype(np.float32)
    tokens = sum(t * h * w for t, h, w in grid) // 4
    assert got.shape == expected.shape == (tokens, tower.config.out_hidden_size if case == "qwen2_5_vl" else 64)
    error = np.abs(got - expected).max() / np.abs(expected).max()
    assert error < 2e-3, f"{case} {grids}: max error {error:.2e} of the largest output"


@pytest.mark.parametrize("case", VLM_CASES)
def test_runtime_inputs_equal_the_transformers_helpers(checkpoint_factory, case):
    """What verify-onnx (and the runtime) feeds equals what transformers computes for the same images."""
    checkpoint = checkpoint_factory(case)
    spec = family_for(json.loads((checkpoint / "config.json").read_text())).vision
    dims = load_vision_dims(checkpoint, spec)
    tower = hf_model(checkpoint).model.visual
    grid = GRIDS["two-images"]
    patches = random_patches(grid, dims.patch_dim)
    ours = visual_feeds(patches, grid, dims, windowed=spec.window_attention)
    theirs = hf_feeds(tower, grid, patches)
    assert set(ours) == set(theirs)
    for name in theirs:
        np.testing.assert_allclose(ours[name], theirs[name], rtol=1e-6, err_msg=name)


def test_patchify_orders_patches_as_the_processor_does(checkpoint_factory):
    """Patch k of the flattened input is the block the processor puts there: merge blocks, then rows."""
    dims = load_vision_dims(
        checkpoint_factory("qwen2_5_vl"),
        family_for(json.loads((checkpoint_factory("qwen2_5_vl") / "config.json").read_text())).vision,
    )
    p, m = dims.patch_size, dims.merge_size
    h, w = 2 * p * m, p * m  # 4 x 2 patches: two merge blocks stacked
    frame = np.arange(dims.in_channels * h * w, dtype=np.float32).reshape(dims.in_channels, h, w)
    patches, grid = patchify(np.stack([frame] * dims.temporal_patch_size), dims)
    assert grid == (1, 4, 2) and patches.shape == (8, dims.patch_dim)
    # Patch 2 is the first patch of the second row of the first merge block: pixel rows p..2p, columns 0..p.
    expected = np.stack([frame[:, p : 2 * p, 0:p]] * dims.temporal_patch_size, axis=1)  # [C, T, P, P]
    np.testing.assert_array_equal(patches[2], expected.reshape(-1))
    # Patch 4 opens the second merge block: pixel rows 2p..3p.
    np.testing.assert_array_equal(patches[4][: p * p], frame[0, 2 * p : 3 * p, 0:p].reshape(-1))


@pytest.mark.parametrize("case", VLM_CASES)
def test_visual_export_directory(checkpoint_factory, visual_export, case):
    checkpoint, export_dir = checkpoint_factory(case), visual_export(case)
    files = {p.name for p in export_dir.iterdir()}
    assert files == {"model.onnx", "onnx_model.data", "config.json", "preprocessor_config.json", "manifest.json"}
    onnx.checker.check_model(str(export_dir / "model.onnx"))
    config = json.loads((export_dir / "config.json").read_text())
    source = json.loads((checkpoint / "config.json").read_text())
    assert {k: config[k] for k in source} == source  # the whole HF config
    assert config["edgellm_version"] == "0.5.0"
    # What the runtime's vision runner reads at the top level.
    assert config["model_type"] == case and config["vocab_size"] == source["text_config"]["vocab_size"]
    assert config["rope_theta"] == source["text_config"]["rope_parameters"]["rope_theta"]
    graph = onnx.load(str(export_dir / "model.onnx"), load_external_data=False)
    inputs = {v.name: v for v in graph.graph.input}
    expected = [io.INPUT, io.ROTARY_POS_EMB, io.ATTENTION_MASK]
    if case == "qwen2_5_vl":
        expected += [io.WINDOW_ATTENTION_MASK, io.WINDOW_INDEX, io.REVERSE_WINDOW_INDEX]
    assert list(inputs) == expected
    types = {name: v.type.tensor_type.elem_type for name, v in inputs.items()}
    assert types[io.INPUT] == onnx.TensorProto.FLOAT16 and types[io.ROTARY_POS_EMB] == onnx.TensorProto.FLOAT
    assert [o.name for o in graph.graph.output] == [io.OUTPUT]


def test_text_only_checkpoint_is_refused(checkpoint_factory, tmp_path):
    with pytest.raises(SourceError, match="no vision tower; export-visual takes"):
        export_visual(checkpoint_factory("qwen2"), tmp_path / "visual")
    assert not (tmp_path / "visual").exists()


def test_unknown_precision_is_refused(checkpoint_factory, tmp_path):
    with pytest.raises(PrecisionError, match="use one of fp16, fp8"):
        export_visual(checkpoint_factory("qwen2_5_vl"), tmp_path / "visual", quantization="int4_awq")
