"""Damaged copies of an LLM export: the bugs verify must catch, made in the graph itself.

Each damage edits the copied graph's tensors (weights in ``onnx_model.data``, scales in the graph)
and re-writes the copy's manifest, so verify reads it as a complete export and has to find the
damage by its numbers alone.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from edgellm_steps.artifacts import steps
from edgellm_steps.artifacts.manifest import MANIFEST_NAME, write_manifest
from edgellm_steps.graph.opsets import EXTERNAL_DATA_FILE, ONNX_NAME

Damage = Callable[[onnx.ModelProto], None]


def _tensors(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in model.graph.initializer}


def _set(tensor: onnx.TensorProto, value: np.ndarray) -> None:
    """Replace ``tensor``'s values, keeping its name and element type (raw bytes: FP8 / FP4 too)."""
    replacement = numpy_helper.from_array(np.ascontiguousarray(value), tensor.name)
    tensor.raw_data = replacement.raw_data
    del tensor.float_data[:], tensor.int32_data[:]


def _value(tensor: onnx.TensorProto) -> np.ndarray:
    return numpy_helper.to_array(tensor)


def _quantizer_scales(model: onnx.ModelProto, quantizer: str) -> list[str]:
    """The scale inputs of every ``<Linear>/<quantizer>/DequantizeLinear`` (the first of nvfp4's two)."""
    return [
        node.input[1]
        for node in model.graph.node
        if node.op_type == "DequantizeLinear" and node.name.endswith(f"/{quantizer}/DequantizeLinear")
    ]


def weight_scales_doubled(model: onnx.ModelProto) -> None:
    """Every Linear's weight dequantization scale twice what the codes were made with."""
    tensors = _tensors(model)
    for name in set(_quantizer_scales(model, "weight_quantizer")):
        _set(tensors[name], (_value(tensors[name]).astype(np.float32) * 2).astype(_value(tensors[name]).dtype))


#: The largest code of each activation format: a scale of 1 / bound is an amax of 1.0.
ACTIVATION_BOUNDS = {"fp8": 448.0, "int8_sq": 127.0, "nvfp4": 6 * 448.0}


def calibration_dropped(weights: str) -> Damage:
    """What calibration made, at its defaults: every activation range at amax 1.0 (scale 1 / the format's
    bound) and every smoothing factor (SmoothQuant, AWQ: the ``input_quantizer/Mul`` scales) at 1."""

    def damage(model: onnx.ModelProto) -> None:
        tensors = _tensors(model)
        for name in set(_quantizer_scales(model, "input_quantizer")):
            _set(tensors[name], np.full_like(_value(tensors[name]), 1.0 / ACTIVATION_BOUNDS[weights]))
        smoothing = {n.input[1] for n in model.graph.node if n.name.endswith("/input_quantizer/Mul")}
        for name in smoothing:
            _set(tensors[name], np.ones_like(_value(tensors[name])))

    return damage


def layer_weights_from(source: int, target: int) -> Damage:
    """Layer ``target``'s Linear weights (codes) replaced by layer ``source``'s, where the shapes agree."""

    def damage(model: onnx.ModelProto) -> None:
        tensors = _tensors(model)
        prefix, other = f"model.layers.{target}.", f"model.layers.{source}."
        for name, tensor in tensors.items():
            twin = tensors.get(name.replace(prefix, other, 1)) if name.startswith(prefix) else None
            if twin is not None and name.endswith("proj.weight") and list(twin.dims) == list(tensor.dims):
                tensor.raw_data = twin.raw_data

    return damage


def damaged_copy(export: Path, destination: Path, damage: Damage) -> Path:
    """A copy of ``export`` with ``damage`` applied to its graph, and a fresh manifest over the copy."""
    shutil.copytree(export, destination)
    model = onnx.load(str(destination / ONNX_NAME), load_external_data=True)
    damage(model)
    (destination / EXTERNAL_DATA_FILE).unlink()
    onnx.save(model, str(destination / ONNX_NAME), save_as_external_data=True, location=EXTERNAL_DATA_FILE)
    parameters = json.loads((destination / MANIFEST_NAME).read_text())["parameters"]
    write_manifest(destination, step=steps.EXPORT_LLM, parameters=parameters)
    return destination
