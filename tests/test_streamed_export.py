"""Exports as a pipeline: the same bytes as before it and at any thread count, digests taken while writing.

The pipeline (artifacts/streamed_file.py, artifacts/read_ahead.py) changes when bytes are read, converted
and written, never which: these tests hold it to the bytes the serial export wrote before the pipeline
existed, and to its own serial mode. The quantized formats get the same comparison in test_quantize.py.
"""

from __future__ import annotations

import importlib
import threading
import time

import numpy as np
import pytest
import torch
import xxhash

from edgellm_steps.artifacts import manifest as manifest_module
from edgellm_steps.artifacts.digests import file_digest, written_digest
from edgellm_steps.artifacts.manifest import write_manifest
from edgellm_steps.artifacts.read_ahead import ReadAhead
from edgellm_steps.artifacts.streamed_file import StreamedFile
from edgellm_steps.cli.export_llm import parse_args
from edgellm_steps.export.export_llm import export_llm

from .support import small_chunks

#: xxh3-128 of the files that export-llm wrote for ``checkpoint_factory("qwen2-bf16", num_hidden_layers=3)``
#: before exports were pipelined (commit a6a13bf: one thread converting and writing in turn).
BEFORE_THE_PIPELINE = {
    "model.onnx": "de6ac67572736872d2818ea376666872",
    "onnx_model.data": "fc1952b19d55f942c03d371185a7d51e",
    "embedding.safetensors": "3ca5335b8a3d4bae2927c080a7446648",
}


def digests(directory):
    return {name: xxhash.xxh3_128_hexdigest((directory / name).read_bytes()) for name in BEFORE_THE_PIPELINE}


def test_an_export_writes_the_bytes_it_wrote_before_the_pipeline_at_any_thread_count(
    checkpoint_factory, tmp_path, monkeypatch
):
    """Three bf16 layers, every weight in several chunks (so that chunks of one tensor convert on different
    threads and finish out of order): serial and pipelined exports both write the earlier bytes, and every
    manifest digest is the file's own although the pipelined export never read its outputs back."""
    checkpoint = checkpoint_factory("qwen2-bf16", num_hidden_layers=3)
    small_chunks(monkeypatch, 1000)
    export_llm(checkpoint, tmp_path / "serial", threads=1)
    export_llm(checkpoint, tmp_path / "pipelined", threads=3)
    assert digests(tmp_path / "serial") == BEFORE_THE_PIPELINE
    assert digests(tmp_path / "pipelined") == BEFORE_THE_PIPELINE
    listed = manifest_module._read_manifest(tmp_path / "pipelined")["files"]
    for name, entry in listed.items():
        assert entry["xxh3_128"] == file_digest(tmp_path / "pipelined" / name), name
    # Control: the comparison sees a change of weights (another seed, same shapes).
    export_llm(checkpoint_factory("qwen2-bf16", num_hidden_layers=3, seed=1), tmp_path / "other", threads=3)
    assert digests(tmp_path / "other")["onnx_model.data"] != BEFORE_THE_PIPELINE["onnx_model.data"]


def chunk_stream():
    """Arrays and conversions of varied sizes, with conversions that finish out of order (the first sleeps)."""
    generator = np.random.default_rng(0)
    parts = [generator.integers(0, 255, size, dtype=np.uint8) for size in (7, 4096, 100_000, 1, 65_536, 3)]

    def slow(part):
        time.sleep(0.05)
        return part

    return parts, [lambda p=parts[0]: slow(p), b"header", parts[1], *[lambda p=p: p.copy() for p in parts[2:]]]


@pytest.mark.parametrize("threads", [1, 4])
def test_a_streamed_file_writes_in_order_and_its_digest_stands_for_the_manifest(tmp_path, threads, monkeypatch):
    parts, chunks = chunk_stream()
    path = tmp_path / "data.bin"
    with StreamedFile(path, threads=threads) as out:
        for chunk in chunks:
            out.write(chunk)
    expected = parts[0].tobytes() + b"header" + b"".join(p.tobytes() for p in parts[1:])
    assert path.read_bytes() == expected
    assert written_digest(path) == file_digest(path) == xxhash.xxh3_128_hexdigest(expected)

    def no_second_read(read_path):
        raise AssertionError(f"{read_path} was read again to be hashed")

    monkeypatch.setattr(manifest_module, "file_digest", no_second_read)
    write_manifest(tmp_path, step="export-llm", parameters={})
    monkeypatch.undo()
    # Control: a file changed after it was written is hashed again, not trusted.
    time.sleep(0.01)
    with path.open("ab") as handle:
        handle.write(b"!")
    assert written_digest(path) is None
    write_manifest(tmp_path, step="export-llm", parameters={})
    assert manifest_module._read_manifest(tmp_path)["files"]["data.bin"]["xxh3_128"] == file_digest(path)


def test_a_failed_conversion_is_raised_by_the_stream_and_stops_it(tmp_path):
    def broken():
        raise ValueError("conversion failed")

    before = threading.active_count()
    with pytest.raises(ValueError, match="conversion failed"), StreamedFile(tmp_path / "data.bin", threads=3) as out:
        for _ in range(50):  # the failure surfaces in a later write or when the block closes the stream
            out.write(broken)
            out.write(b"x" * 10)
    assert threading.active_count() == before  # the pool and the writer stopped
    assert written_digest(tmp_path / "data.bin") is None


def wait_until(condition, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def test_reading_ahead_hands_over_the_tensors_within_its_budget():
    tensors = {f"layer{i}.{kind}": torch.full((250,), float(i)) for i in range(6) for kind in "abc"}
    reading, peak, lock = set(), [0], threading.Lock()
    held = []

    def read(name):
        with lock:
            reading.add(name)
        time.sleep(0.01)
        held.append(name)
        peak[0] = max(peak[0], len(held))
        return tensors[name].clone()

    ahead = ReadAhead(read, lambda name: 1000, budget=2000)
    try:
        for layer in range(6):
            ahead.add([f"layer{layer}.{kind}" for kind in "abc"])
            time.sleep(0.05)  # the reader fills its budget, no more
            assert peak[0] <= 2
            for kind in "abc":
                name = f"layer{layer}.{kind}"
                assert wait_until(lambda name=name: name in reading)  # c starts once a's budget is taken back
                assert torch.equal(ahead.take(name), tensors[name])
                held.remove(name)
        assert ahead.take("layer0.a") is None  # taken already: the caller reads it itself
        # A batch never asked for is dropped two batches later: its names are read by the caller.
        ahead.add(["layer0.a"])
        ahead.add(["layer1.a"])
        ahead.add(["layer2.a"])
        assert ahead.take("layer0.a") is None
    finally:
        ahead.close()


def test_a_tensor_asked_for_out_of_file_order_is_never_waited_for_beyond_the_budget():
    """The reader holds its budget in tensors the caller wants later; the caller asks for the next one first.

    A read must not be waited for while it waits for the budget: the caller reads that tensor itself."""
    reads = []
    ahead = ReadAhead(lambda name: reads.append(name) or name.upper(), lambda name: 1000, budget=2000)
    try:
        ahead.add(["a", "b", "c"])
        assert wait_until(lambda: reads == ["a", "b"])  # the budget is full, c waits
        time.sleep(0.1)  # for the reader to reach c (the fault was to mark c started while it waited)
        result = []
        asking = threading.Thread(target=lambda: result.append(ahead.take("c")), daemon=True)
        asking.start()
        asking.join(timeout=5)
        assert not asking.is_alive(), "take('c') waits on a read that waits for the budget"
        assert result == [None]  # not started: the caller reads it itself
        assert ahead.take("a") == "A" and ahead.take("b") == "B"
    finally:
        ahead.close()


def test_a_dropped_batch_gives_its_budget_back_even_when_its_read_failed():
    reads = []

    def read(name):
        reads.append(name)
        if name == "x":
            raise OSError("unreadable")
        return name.upper()

    ahead = ReadAhead(read, lambda name: 1500, budget=2000)
    try:
        ahead.add(["x", "y"])  # x fails, y waits for the budget x holds
        assert wait_until(lambda: reads == ["x"])
        ahead.add(["p"])
        ahead.add(["q"])  # drops x and y: x's bytes leave the budget
        assert wait_until(lambda: "p" in reads), "p is never read ahead: x's failed read still holds the budget"
        assert ahead.take("p") == "P"
    finally:
        ahead.close()


def test_the_thread_count_must_be_positive():
    with pytest.raises(SystemExit):
        parse_args(["--model_dir", "m", "--output_dir", "o", "--threads", "0"])
    assert parse_args(["--model_dir", "m", "--output_dir", "o", "--threads", "3"]).threads == 3


@pytest.mark.parametrize(
    ("step", "required"),
    [
        ("calibrate_llm", ["--model_dir", "m", "--output_dir", "o"]),
        ("quantize_llm", ["--model_dir", "m", "--output_dir", "o", "--precision", "fp8"]),
        (
            "quantize_draft",
            ["--base_model_dir", "b", "--draft_model_dir", "d", "--output_dir", "o", "--precision", "fp8"],
        ),
        ("verify_onnx", ["--onnx_dir", "x", "--model_dir", "m"]),
    ],
)
@pytest.mark.parametrize("threads", ["0", "-2", "two"])
def test_torch_steps_refuse_a_thread_count_below_one_in_one_usage_line(step, required, threads, capsys):
    """Every step's ``--threads`` is read the same way: a usage error (exit 2) before any work."""
    main = importlib.import_module(f"edgellm_steps.cli.{step}").main
    with pytest.raises(SystemExit) as exit_info:
        main([*required, "--threads", threads])
    assert exit_info.value.code == 2
    assert "argument --threads:" in capsys.readouterr().err


def every_dtype() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    floats = torch.randn(3, 5, generator=generator)
    tensors = {
        f"t.{dtype}": floats.to(getattr(torch, dtype))
        for dtype in ("bfloat16", "float16", "float32", "float64", "float8_e4m3fn", "float8_e5m2")
    }
    tensors |= {f"i.{dtype}": torch.arange(-3, 3).to(getattr(torch, dtype)) for dtype in ("int8", "int16", "int32")}
    tensors |= {"i.int64": torch.arange(6).reshape(2, 3), "u": torch.arange(4, dtype=torch.uint8)}
    return tensors | {"b": torch.tensor([True, False, True]), "scalar": torch.tensor(1.5), "empty": torch.zeros(0, 3)}


def test_checkpoint_shards_are_the_safetensors_librarys_bytes_hashed_as_written(tmp_path, monkeypatch):
    """quantize-llm's and quantize-draft's weights (write_safetensors) are what safetensors' save_file writes, byte
    for byte, for every dtype; their digest comes from the writing."""
    from safetensors.torch import save_file

    from edgellm_steps.artifacts import safetensors_io
    from edgellm_steps.artifacts.safetensors_io import write_safetensors

    tensors = every_dtype()
    for metadata in ({"format": "pt"}, None):
        save_file(tensors, str(tmp_path / "library.safetensors"), metadata=metadata)
        write_safetensors(tmp_path / "ours.safetensors", tensors, metadata=metadata)
        ours = (tmp_path / "ours.safetensors").read_bytes()
        assert ours == (tmp_path / "library.safetensors").read_bytes()
        assert written_digest(tmp_path / "ours.safetensors") == xxhash.xxh3_128_hexdigest(ours)
    # Control: another order of the dtypes is another file, which the comparison sees.
    monkeypatch.setattr(safetensors_io, "DTYPE_ORDER", tuple(reversed(safetensors_io.DTYPE_ORDER)))
    write_safetensors(tmp_path / "reordered.safetensors", tensors)
    assert (tmp_path / "reordered.safetensors").read_bytes() != (tmp_path / "library.safetensors").read_bytes()
