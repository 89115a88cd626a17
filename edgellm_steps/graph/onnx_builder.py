"""A small ONNX graph builder that streams weights into one external-data file.

Weights never live in the ONNX proto: each one is converted, written to
``onnx_model.data`` at an aligned offset and referenced from the initializer,
then dropped. The proto therefore stays a few hundred kB even for an 8B model,
and peak memory is one tensor, not the model.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgellm_steps.graph.opsets import EXTERNAL_DATA_FILE, FP4_OPSET, ONNX_NAME, OPSET

log = logging.getLogger(__name__)

#: The lowest IR version that knows each opset's types (FLOAT4E2M1 needs IR 11).
IR_VERSION = {OPSET: 9, FP4_OPSET: 11}
PLUGIN_DOMAIN = "trt"
_SMALL_ALIGN = 64
_PAGE_ALIGN = 4096
_PAGE_ALIGN_THRESHOLD = 1 << 20

NP_TO_ONNX = {
    np.dtype(np.float16): TensorProto.FLOAT16,
    np.dtype(np.float32): TensorProto.FLOAT,
    np.dtype(np.int64): TensorProto.INT64,
    np.dtype(np.int32): TensorProto.INT32,
    np.dtype(np.int8): TensorProto.INT8,
    np.dtype(np.uint8): TensorProto.UINT8,
}


class ExternalDataWriter:
    """Appends raw tensors to one data file and returns initializers that reference them."""

    def __init__(self, directory: Path) -> None:
        self.location = EXTERNAL_DATA_FILE
        self._handle = open(Path(directory) / self.location, "wb")  # noqa: SIM115 - closed by close()
        self._offset = 0
        self.bytes_written = 0

    def add_chunks(
        self,
        name: str,
        dtype: np.dtype,
        shape: tuple[int, ...],
        chunks: Iterable[np.ndarray],
        *,
        elem_type: int | None = None,
        dims: tuple[int, ...] | None = None,
    ) -> TensorProto:
        """Write a tensor whose row-major data arrives in chunks; only one chunk is alive at a time.

        ``elem_type`` overrides the ONNX type for data handed over as raw bytes of
        another NumPy dtype (float8 weights arrive as uint8); ``dims`` overrides the
        ONNX shape where it differs from the bytes' ``shape`` (two FP4 codes per byte).
        """
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape)) * dtype.itemsize
        align = _PAGE_ALIGN if nbytes >= _PAGE_ALIGN_THRESHOLD else _SMALL_ALIGN
        pad = -self._offset % align
        if pad:
            self._handle.write(b"\0" * pad)
            self._offset += pad
        written = 0
        for chunk in chunks:
            data = np.ascontiguousarray(chunk, dtype=dtype)
            self._handle.write(memoryview(data).cast("B"))
            written += data.nbytes
        if written != nbytes:
            raise ValueError(f"tensor {name!r}: got {written} bytes for shape {tuple(shape)}, expected {nbytes}")
        tensor = TensorProto(name=name, data_type=elem_type or NP_TO_ONNX[dtype], dims=list(dims or shape))
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.location), ("offset", self._offset), ("length", nbytes)):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, str(value)
        self._offset += nbytes
        self.bytes_written += nbytes
        return tensor

    def close(self) -> None:
        self._handle.close()


class GraphBuilder:
    """Collects nodes, inputs, outputs and initializers of one graph."""

    def __init__(self, writer: ExternalDataWriter) -> None:
        self.writer = writer
        self.nodes: list[onnx.NodeProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self.initializers: list[TensorProto] = []
        self._constants: dict[tuple, str] = {}
        self._names: set[str] = set()

    def _unique(self, name: str) -> str:
        candidate, n = name, 1
        while candidate in self._names:
            candidate = f"{name}_{n}"
            n += 1
        self._names.add(candidate)
        return candidate

    def add_input(self, name: str, elem_type: int, dims: list[int | str]) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, elem_type, dims))
        self._names.add(name)
        return name

    def add_output(self, name: str, elem_type: int, dims: list[int | str]) -> None:
        self.outputs.append(helper.make_tensor_value_info(name, elem_type, dims))

    def weight(self, name: str, array: np.ndarray) -> str:
        """A weight stored in the external-data file."""
        return self.weight_chunks(name, array.dtype, array.shape, [array])

    def weight_chunks(
        self,
        name: str,
        dtype: np.dtype,
        shape: tuple[int, ...],
        chunks: Iterable[np.ndarray],
        *,
        elem_type: int | None = None,
        dims: tuple[int, ...] | None = None,
    ) -> str:
        """A weight streamed to the external-data file chunk by chunk."""
        self.initializers.append(self.writer.add_chunks(name, dtype, shape, chunks, elem_type=elem_type, dims=dims))
        self._names.add(name)
        return name

    def constant(self, array: np.ndarray, hint: str = "const") -> str:
        """A small constant stored inline; identical constants are shared."""
        array = np.asarray(array)
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self._constants:
            name = self._unique(f"/constants/{hint}")
            self.initializers.append(numpy_helper.from_array(array, name))
            self._constants[key] = name
        return self._constants[key]

    def typed_constant(self, elem_type: int, value: float, hint: str = "const") -> str:
        """A scalar constant of an ONNX type NumPy lacks (float8 zero points)."""
        key = (elem_type, (), (value,))
        if key not in self._constants:
            name = self._unique(f"/constants/{hint}")
            self.initializers.append(helper.make_tensor(name, elem_type, [], [value]))
            self._constants[key] = name
        return self._constants[key]

    def node(
        self,
        op_type: str,
        inputs: list[str],
        name: str,
        *,
        outputs: list[str] | int = 1,
        domain: str = "",
        **attrs: Any,
    ) -> list[str]:
        """Add a node called ``name``; returns its output names (``<name>_output_<k>`` unless given)."""
        name = self._unique(name)
        if isinstance(outputs, int):
            outputs = [self._unique(f"{name}_output_{k}") for k in range(outputs)]
        self.nodes.append(helper.make_node(op_type, inputs, outputs, name=name, domain=domain, **attrs))
        return outputs

    def op(self, op_type: str, inputs: list[str], name: str, **attrs: Any) -> str:
        """A single-output node; returns its output name."""
        return self.node(op_type, inputs, name, **attrs)[0]

    def to_model(self, graph_name: str, *, opset: int = OPSET) -> onnx.ModelProto:
        """The model, importing ``opset`` and version 1 of the plugin domain."""
        graph = helper.make_graph(self.nodes, graph_name, self.inputs, self.outputs, self.initializers)
        opsets = [helper.make_opsetid("", opset), helper.make_opsetid(PLUGIN_DOMAIN, 1)]
        model = helper.make_model(graph, opset_imports=opsets, producer_name="edgellm_steps")
        model.ir_version = IR_VERSION[opset]
        return model


def write_graph(directory: Path, build: Callable[[GraphBuilder], onnx.ModelProto]) -> None:
    """``build`` a graph whose weights stream into ``directory``/onnx_model.data; save and check ``model.onnx``."""
    writer = ExternalDataWriter(directory)
    try:
        model = build(GraphBuilder(writer))
    finally:
        writer.close()
    log.info("wrote %.1f MB of weights to %s", writer.bytes_written / 1e6, EXTERNAL_DATA_FILE)
    onnx.save_model(model, str(Path(directory) / ONNX_NAME))
    onnx.checker.check_model(str(Path(directory) / ONNX_NAME))
