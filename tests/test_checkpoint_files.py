"""Checkpoint weight files are untrusted data: which files hold weights, and what a valid header is.

Damaged files are written by hand (``struct`` + ``json``), valid ones with the safetensors
library, whose own reader (``safetensors.torch.load_file``) is the reference for values.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import tracemalloc
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from edgellm_steps.artifacts.checkpoint import TensorStore, weight_files
from edgellm_steps.artifacts.safetensors_io import SafetensorsFile
from edgellm_steps.errors import SourceError


@contextmanager
def one_line_error(match: str) -> Iterator[None]:
    """Expect a :class:`SourceError` matching ``match``, whose message is a single line."""
    with pytest.raises(SourceError, match=match) as caught:
        yield
    assert "\n" not in str(caught.value)


def write_raw(path: Path, header: Any, data: bytes = b"", *, length: int | None = None) -> Path:
    """A safetensors-shaped file: 8-byte length, ``header`` (JSON-encoded unless bytes), ``data``."""
    encoded = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded) if length is None else length) + encoded + data)
    return path


def f32(shape: list[int], begin: int) -> dict[str, Any]:
    """A float32 header entry of ``shape`` starting at data byte ``begin``."""
    count = 1
    for dim in shape:
        count *= dim
    return {"dtype": "F32", "shape": shape, "data_offsets": [begin, begin + 4 * count]}


def save(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    save_file(tensors, str(path), metadata={"format": "pt"})
    return path


def tiny_tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "a.weight": torch.randn(5, 3, generator=generator),
        "b.bias": torch.randn(4, generator=generator).to(torch.bfloat16),
    }


# --- SafetensorsFile: the header is validated completely on open ---------------------------------


def test_file_shorter_than_the_length_prefix(tmp_path):
    path = tmp_path / "short.safetensors"
    path.write_bytes(b"\x01\x02\x03")
    with one_line_error(r"short\.safetensors is not a valid safetensors file: it is 3 bytes long, shorter than"):
        SafetensorsFile(path)


def test_huge_header_length_fails_fast_without_allocating(tmp_path):
    path = write_raw(tmp_path / "huge.safetensors", {}, length=2**40)
    tracemalloc.start()
    try:
        with one_line_error(r"huge\.safetensors is not a valid safetensors file: its header length 1099511627776 is"):
            SafetensorsFile(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000


def test_header_length_past_the_end_of_the_file(tmp_path):
    path = write_raw(tmp_path / "cut.safetensors", {}, length=1000)
    with one_line_error(r"cut\.safetensors .*header length 1000 runs past the end of the \d+-byte file; re-download"):
        SafetensorsFile(path)


def test_header_not_utf8(tmp_path):
    path = write_raw(tmp_path / "bytes.safetensors", b'{"\xff": 1}')
    with one_line_error(r"bytes\.safetensors .*header is not UTF-8"):
        SafetensorsFile(path)


def test_header_not_json(tmp_path):
    path = write_raw(tmp_path / "text.safetensors", b"{not json")
    with one_line_error(r"text\.safetensors .*header is not valid JSON"):
        SafetensorsFile(path)


def test_header_integer_past_pythons_digit_limit(tmp_path):
    path = write_raw(tmp_path / "digits.safetensors", b'{"x": ' + b"9" * 5000 + b"}")
    with one_line_error(r"digits\.safetensors .*header is not valid JSON"):
        SafetensorsFile(path)


def test_header_json_list(tmp_path):
    path = write_raw(tmp_path / "list.safetensors", [1, 2])
    with one_line_error(r"list\.safetensors .*header is a JSON list, not an object; re-download it"):
        SafetensorsFile(path)


def test_metadata_not_strings(tmp_path):
    path = write_raw(tmp_path / "meta.safetensors", {"__metadata__": {"format": 1}})
    with one_line_error(r"meta\.safetensors .*__metadata__ is not an object of strings"):
        SafetensorsFile(path)


def test_entry_not_an_object(tmp_path):
    path = write_raw(tmp_path / "entry.safetensors", {"w": [1, 2]})
    with one_line_error(r"entry\.safetensors .*tensor 'w' has a JSON list entry, not an object"):
        SafetensorsFile(path)


def test_unknown_dtype_names_tensor_and_dtype(tmp_path):
    header = {"w": {"dtype": "C128", "shape": [1], "data_offsets": [0, 16]}}
    path = write_raw(tmp_path / "dtype.safetensors", header, bytes(16))
    with one_line_error(r"dtype\.safetensors: tensor 'w' has unsupported dtype 'C128' \(supported: F64, "):
        SafetensorsFile(path)


@pytest.mark.parametrize("shape", [[-1, 2], [2.0], "2", [True], None])
def test_shape_not_a_list_of_non_negative_ints(tmp_path, shape):
    header = {"w": {"dtype": "F32", "shape": shape, "data_offsets": [0, 8]}}
    path = write_raw(tmp_path / "shape.safetensors", header, bytes(8))
    with one_line_error(r"shape\.safetensors .*tensor 'w' has shape .*, not a list of non-negative integers"):
        SafetensorsFile(path)


@pytest.mark.parametrize("offsets", [[0], [0, 8, 16], [0, "8"], [0.0, 8], None])
def test_data_offsets_not_two_ints(tmp_path, offsets):
    header = {"w": {"dtype": "F32", "shape": [2], "data_offsets": offsets}}
    path = write_raw(tmp_path / "offsets.safetensors", header, bytes(8))
    with one_line_error(r"offsets\.safetensors .*tensor 'w' has data_offsets .*, not a list of two integers"):
        SafetensorsFile(path)


def test_reversed_offsets(tmp_path):
    header = {"w": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}
    path = write_raw(tmp_path / "reversed.safetensors", header, bytes(8))
    with one_line_error(r"reversed\.safetensors .*tensor 'w' has data_offsets \[8, 0\], not 0 <= begin <= end"):
        SafetensorsFile(path)


def test_negative_offset(tmp_path):
    header = {"w": {"dtype": "F32", "shape": [0], "data_offsets": [-4, -4]}}
    path = write_raw(tmp_path / "negative.safetensors", header)
    with one_line_error(r"negative\.safetensors .*not 0 <= begin <= end"):
        SafetensorsFile(path)


def test_byte_count_disagrees_with_shape(tmp_path):
    header = {"w": {"dtype": "F32", "shape": [3, 2], "data_offsets": [0, 16]}}
    path = write_raw(tmp_path / "count.safetensors", header, bytes(16))
    with one_line_error(r"count\.safetensors .*tensor 'w' spans 16 bytes but its shape \[3, 2\] of F32 needs 24 bytes"):
        SafetensorsFile(path)


def test_hostile_shape_product_is_refused_cheaply(tmp_path):
    header = {"w": {"dtype": "F32", "shape": [2**62] * 1000, "data_offsets": [0, 8]}}
    path = write_raw(tmp_path / "bignum.safetensors", header, bytes(8))
    with one_line_error(r"bignum\.safetensors .*spans 8 bytes but its shape .* needs more than 2\*\*64 bytes"):
        SafetensorsFile(path)


def test_overlapping_offsets(tmp_path):
    header = {"a": f32([4], 0), "b": f32([4], 8)}
    path = write_raw(tmp_path / "overlap.safetensors", header, bytes(24))
    with one_line_error(r"overlap\.safetensors .*tensors 'a' and 'b' overlap"):
        SafetensorsFile(path)


def test_data_past_the_end_is_truncated(tmp_path):
    header = {"a": f32([4], 0), "b": f32([4], 16)}
    path = write_raw(tmp_path / "trunc.safetensors", header, bytes(20))
    with one_line_error(r"trunc\.safetensors .*truncated: tensor 'b' ends at data byte 32 .* only 20 data bytes"):
        SafetensorsFile(path)


def test_ascending_ranges_with_a_gap_are_accepted(tmp_path):
    values = torch.arange(4, dtype=torch.float32)
    data = values.numpy().tobytes() + bytes(8) + (values + 10).numpy().tobytes()
    path = write_raw(tmp_path / "gap.safetensors", {"a": f32([4], 0), "b": f32([4], 24)}, data)
    store = SafetensorsFile(path)
    assert torch.equal(store.read("b"), values + 10)
    assert torch.equal(store.read("a"), values)


def test_valid_file_reads_like_the_safetensors_library(tmp_path):
    generator = torch.Generator().manual_seed(1)
    tensors = {
        "f32": torch.randn(7, 5, generator=generator),
        "f16": torch.randn(3, 4, generator=generator).half(),
        "bf16": torch.randn(6, generator=generator).bfloat16(),
        "fp8": torch.randn(4, 4, generator=generator).to(torch.float8_e4m3fn),
        "i32": torch.randint(-100, 100, (2, 3, 4), generator=generator, dtype=torch.int32),
        "u8": torch.randint(0, 255, (9,), generator=generator, dtype=torch.uint8),
        "mask": torch.rand(5, generator=generator) > 0.5,
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 4),
    }
    path = save(tmp_path / "model.safetensors", tensors)
    expected = load_file(str(path))
    store = SafetensorsFile(path)
    assert sorted(store.names()) == sorted(expected)
    for name, reference in expected.items():
        assert store.shape(name) == tuple(reference.shape)
        got = store.read(name)
        assert got.dtype == reference.dtype
        assert torch.equal(got.reshape(-1).view(torch.uint8), reference.reshape(-1).view(torch.uint8)), name
    rows = torch.cat(list(store.read_row_chunks("f32", 3)))
    assert torch.equal(rows, expected["f32"])


# --- weight_files: one rule for which files hold a checkpoint's weights --------------------------


def write_index(checkpoint: Path, weight_map: Any) -> Path:
    index = checkpoint / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return index


def sharded(checkpoint: Path) -> dict[str, torch.Tensor]:
    """Two shards and their index, as save_pretrained writes them; returns all tensors."""
    checkpoint.mkdir(exist_ok=True)
    first, second = tiny_tensors(0), {"c.weight": torch.randn(2, 2)}
    save(checkpoint / "model-00001-of-00002.safetensors", first)
    save(checkpoint / "model-00002-of-00002.safetensors", second)
    weight_map = {name: "model-00001-of-00002.safetensors" for name in first}
    weight_map |= {name: "model-00002-of-00002.safetensors" for name in second}
    write_index(checkpoint, weight_map)
    return first | second


def test_index_names_sorted_deduplicated_shards(tmp_path):
    tensors = sharded(tmp_path)
    assert weight_files(tmp_path) == [
        tmp_path / "model-00001-of-00002.safetensors",
        tmp_path / "model-00002-of-00002.safetensors",
    ]
    store = TensorStore(tmp_path)
    for name, reference in tensors.items():
        assert torch.equal(store.get(name), reference)


def test_index_not_json(tmp_path):
    (tmp_path / "model.safetensors.index.json").write_text("{oops")
    with one_line_error(r"model\.safetensors\.index\.json is not valid JSON .*; re-download it"):
        weight_files(tmp_path)


@pytest.mark.parametrize("content", [[1, 2], {"metadata": {}}, {"weight_map": ["x.safetensors"]}, {"weight_map": {}}])
def test_index_without_a_weight_map_object(tmp_path, content):
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(content))
    with one_line_error(r"model\.safetensors\.index\.json has no 'weight_map' object"):
        weight_files(tmp_path)


@pytest.mark.parametrize("shard", ["../x.safetensors", "/etc/passwd", "sub/../../x.safetensors"])
def test_index_naming_a_path_outside_the_checkpoint_is_refused(tmp_path, shard):
    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    save(tmp_path / "x.safetensors", tiny_tensors())
    write_index(checkpoint, {"a.weight": shard})
    with one_line_error(r"index\.json: tensor 'a\.weight' maps to shard .*, a path outside the checkpoint directory"):
        weight_files(checkpoint)


def test_index_naming_a_non_string_shard_is_refused(tmp_path):
    write_index(tmp_path, {"a.weight": 3})
    with one_line_error(r"index\.json: tensor 'a\.weight' maps to 3, not a shard file name"):
        weight_files(tmp_path)


def test_shard_in_a_subdirectory_is_accepted(tmp_path):
    (tmp_path / "weights").mkdir()
    save(tmp_path / "weights" / "part.safetensors", tiny_tensors())
    write_index(tmp_path, {"a.weight": "weights/part.safetensors", "b.bias": "./weights/part.safetensors"})
    assert weight_files(tmp_path) == [tmp_path / "weights" / "part.safetensors"]


def test_missing_shard(tmp_path):
    write_index(tmp_path, {"a.weight": "model-00001-of-00002.safetensors"})
    with one_line_error(r"shard model-00001-of-00002\.safetensors listed in the index is missing; re-download it"):
        weight_files(tmp_path)


def test_hf_cache_symlinked_shards_are_accepted(tmp_path):
    """The HF cache: snapshot files are relative symlinks into ``blobs/``, outside the snapshot."""
    blobs = tmp_path / "models--org--name" / "blobs"
    snapshot = tmp_path / "models--org--name" / "snapshots" / "0123abc"
    blobs.mkdir(parents=True)
    snapshot.mkdir(parents=True)
    tensors = tiny_tensors()
    save(blobs / "9f86d081884c7d65", tensors)
    os.symlink("../../blobs/9f86d081884c7d65", snapshot / "model.safetensors")
    assert weight_files(snapshot) == [snapshot / "model.safetensors"]
    store = TensorStore(snapshot)
    for name, reference in tensors.items():
        assert torch.equal(store.get(name), reference)


def test_index_and_model_safetensors_disagreeing_is_refused(tmp_path):
    sharded(tmp_path)
    save(tmp_path / "model.safetensors", tiny_tensors(1))
    with one_line_error(
        r"has both model\.safetensors and model\.safetensors\.index\.json naming other shards; "
        r"the two disagree about the weights: remove one"
    ):
        weight_files(tmp_path)


def test_index_naming_model_safetensors_agrees(tmp_path):
    tensors = tiny_tensors()
    save(tmp_path / "model.safetensors", tensors)
    write_index(tmp_path, dict.fromkeys(tensors, "model.safetensors"))
    assert weight_files(tmp_path) == [tmp_path / "model.safetensors"]


def test_stray_adapter_beside_model_safetensors_is_not_weights(tmp_path):
    tensors = tiny_tensors()
    save(tmp_path / "model.safetensors", tensors)
    save(tmp_path / "adapter_model.safetensors", {"lora_A.weight": torch.ones(2, 2)})
    assert weight_files(tmp_path) == [tmp_path / "model.safetensors"]
    store = TensorStore(tmp_path)
    assert "lora_A.weight" not in store and "a.weight" in store


def test_pickled_weights_only_are_refused(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with one_line_error(
        r"holds only pickled PyTorch weights \(pytorch_model\.bin\), which this project does not load "
        r"\(unpickling can run code\); convert them to safetensors with transformers' "
        r"save_pretrained\(safe_serialization=True\)"
    ):
        weight_files(tmp_path)


def test_no_weights_at_all(tmp_path):
    save(tmp_path / "consolidated.safetensors", tiny_tensors())
    with one_line_error(r"holds no safetensors weights \(neither model\.safetensors nor model\.safetensors\.index"):
        weight_files(tmp_path)


def test_tensor_store_validates_every_shard_on_open(tmp_path):
    sharded(tmp_path)
    shard = tmp_path / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-4])
    with one_line_error(r"model-00002-of-00002\.safetensors is not a valid safetensors file: it is truncated"):
        TensorStore(tmp_path)


def test_weight_files_does_not_import_torch():
    """Planning calls weight_files; importing checkpoint.py must stay torch-free."""
    code = "import sys, edgellm_steps.artifacts.checkpoint; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def _overlapping_shard(checkpoint: Path) -> None:
    """Rewrite ``model.safetensors`` so that its second tensor starts inside its first."""
    path = checkpoint / "model.safetensors"
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + length])
    first, second = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])[:2]
    begin, end = header[second]["data_offsets"]
    shift = min(begin - header[first]["data_offsets"][0], 2)
    header[second]["data_offsets"] = [begin - shift, end - shift]
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + raw[8 + length :])


@pytest.mark.parametrize("tool", ["edgellm-export-llm", "edgellm-quantize-llm", "edgellm-verify-onnx"])
def test_every_step_reports_a_bad_shard_in_one_line(checkpoint_factory, tmp_path, tool):
    from .support import BIN, tool_env

    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    for item in checkpoint_factory("qwen2").iterdir():
        (checkpoint / item.name).write_bytes(item.read_bytes())
    _overlapping_shard(checkpoint)
    if tool == "edgellm-verify-onnx":  # verify checks its export first, so it needs a finished one
        from edgellm_steps.export.export_llm import export_llm

        export_llm(checkpoint_factory("qwen2"), tmp_path / "export")
    args = {
        "edgellm-export-llm": ["--output_dir", str(tmp_path / "out")],
        "edgellm-quantize-llm": ["--output_dir", str(tmp_path / "out"), "--precision", "fp8"],
        "edgellm-verify-onnx": ["--onnx_dir", str(tmp_path / "export"), "--report", str(tmp_path / "out")],
    }[tool]
    result = subprocess.run(
        [str(BIN / tool), "--model_dir", str(checkpoint), *args], env=tool_env(), capture_output=True, text=True
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "model.safetensors" in last and "overlap" in last and "re-download" in last
    assert not (tmp_path / "out").exists()
