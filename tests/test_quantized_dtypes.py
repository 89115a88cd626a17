"""quantize-llm writes the tensors its calibration left unchanged in the source's dtype, not the CPU's float32.

The check that this loses nothing is made by the consumers: export-llm of the checkpoint equals, byte for byte,
export-llm of the same checkpoint with every tensor widened to float32 (what quantize-llm wrote before).
"""

from __future__ import annotations

import shutil

import torch
from safetensors.torch import load_file, save_file

from edgellm_steps.artifacts import shard_writer, steps
from edgellm_steps.artifacts.checkpoint import weight_files
from edgellm_steps.artifacts.manifest import check_step_output, write_manifest
from edgellm_steps.artifacts.shard_writer import ShardWriter, as_stored
from edgellm_steps.export.export_llm import export_llm
from edgellm_steps.quant.quantize_llm import quantize_llm

CALIBRATION = {"calib_size": 2, "calib_max_tokens": 8}


def tensors(directory) -> dict[str, torch.Tensor]:
    return {name: t for shard in weight_files(directory) for name, t in load_file(str(shard)).items()}


def rewritten(quantized, destination, cast) -> None:
    """A copy of a quantize-llm output with ``cast`` applied to every tensor, its manifest written again."""
    shutil.copytree(quantized, destination)
    for shard in weight_files(destination):
        save_file({name: cast(name, t) for name, t in load_file(str(shard)).items()}, str(shard), {"format": "pt"})
    parameters = check_step_output(quantized, steps.QUANTIZE_LLM)["parameters"]
    write_manifest(destination, step=steps.QUANTIZE_LLM, parameters=parameters)


def exported_bytes(checkpoint, destination) -> tuple[bytes, bytes]:
    export_llm(checkpoint, destination)
    return (destination / "model.onnx").read_bytes(), (destination / "onnx_model.data").read_bytes()


def test_unchanged_tensors_keep_the_source_dtype_and_export_as_their_float32_copy(checkpoint_factory, tmp_path):
    source = checkpoint_factory("qwen2-bf16")
    stored = tensors(source)
    quantize_llm(source, tmp_path / "fp8", precision="fp8", **CALIBRATION)
    fp8 = tensors(tmp_path / "fp8")
    # fp8's max calibration changes no weight: every source tensor comes out as stored, the scales in float32.
    assert all(fp8[name].dtype == torch.bfloat16 and torch.equal(fp8[name], t) for name, t in stored.items())
    scales = [name for name in fp8 if "_quantizer." in name]
    assert scales and all(fp8[name].dtype == torch.float32 for name in scales)
    rewritten(tmp_path / "fp8", tmp_path / "fp8-float32", lambda name, t: t.float())
    assert exported_bytes(tmp_path / "fp8", tmp_path / "a") == exported_bytes(tmp_path / "fp8-float32", tmp_path / "b")

    # int8_sq smooths the Linear weights: their new values do not fit bf16, so they stay float32.
    quantize_llm(source, tmp_path / "sq", precision="int8_sq", **CALIBRATION)
    sq = tensors(tmp_path / "sq")
    smoothed = [name for name in stored if sq[name].dtype == torch.float32]
    assert smoothed and all(name.endswith("proj.weight") for name in smoothed)
    assert all(not torch.equal(sq[name].bfloat16().float(), sq[name]) for name in smoothed)
    assert all(torch.equal(sq[name], t) for name, t in stored.items() if name not in smoothed)
    # Control: writing every tensor in the source's dtype regardless (rounding the smoothed ones) changes the export.
    rewritten(tmp_path / "sq", tmp_path / "sq-rounded", lambda name, t: t.bfloat16() if name in smoothed else t)
    assert exported_bytes(tmp_path / "sq", tmp_path / "c") != exported_bytes(tmp_path / "sq-rounded", tmp_path / "d")


def test_a_tensor_is_narrowed_only_when_every_slice_fits(monkeypatch):
    monkeypatch.setattr(shard_writer, "NARROW_ELEMENTS", 7)  # slices of 7 elements, the last one short
    fits = torch.randn(5, 9).bfloat16().float()
    narrowed = as_stored(fits, "BF16")
    assert narrowed.dtype == torch.bfloat16 and torch.equal(narrowed.float(), fits)
    last_off = fits.clone()
    last_off[-1, -1] = 1.0 + 2.0**-20  # the last element alone needs float32's precision
    assert as_stored(last_off, "BF16") is last_off
    assert as_stored(fits, "F32") is fits and as_stored(fits, "I64") is fits
    assert as_stored(torch.arange(6), "BF16").dtype == torch.int64


def test_a_tensor_with_a_shard_of_its_own_is_narrowed_as_it_is_written(monkeypatch, tmp_path):
    """The same bytes as the safetensors library's file of the narrowed tensor, with no narrowed copy made whole."""
    monkeypatch.setattr(shard_writer, "NARROW_ELEMENTS", 7)
    head = torch.linspace(-3, 3, 30).reshape(6, 5).bfloat16().float()
    changed = head + 2.0**-20  # not a bf16 value any more: stays float32
    writer = ShardWriter(tmp_path / "out", max_shard_bytes=40, stored_dtypes={"head": "BF16", "changed": "BF16"})
    (tmp_path / "out").mkdir()
    with monkeypatch.context() as whole:
        whole.setattr(shard_writer, "as_stored", None)  # the large tensor must not be narrowed whole
        writer.add("head", head)
    writer.add("changed", changed)
    first, second = writer.close()
    save_file({"head": head.bfloat16()}, str(tmp_path / "expected.safetensors"), {"format": "pt"})
    assert first.read_bytes() == (tmp_path / "expected.safetensors").read_bytes()
    assert load_file(str(second))["changed"].dtype == torch.float32
