"""A small ONNX graph builder that streams weights into one external-data file.

Weights never live in the ONNX proto: each one is converted, written to
``onnx_model.data`` at an aligned offset and referenced from the initializer,
then dropped. The proto therefore stays a few hundred kB even for an 8B model,
and peak memory is a few tensors, not the model. Conversions may be handed over
still to run, so that a pipelined sink overlaps them with the reads and writes
around them.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Protocol

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


class DataSink(Protocol):
    """Where the weights' bytes go, in order: a chunk is data or a function of no arguments returning it.

    The export hands over conversions still to run, so that a pipelined sink
    (:class:`~edgellm_steps.artifacts.streamed_file.StreamedFile`) runs them on several threads while
    the graph goes on; :class:`PlainFile` runs them at once.
    """

    def write(self, chunk: Any) -> None: ...

    def close(self) -> Any: ...

    def abort(self) -> None: ...


class PlainFile:
    """A :class:`DataSink` that converts and writes each chunk in the caller's thread."""

    def __init__(self, path: Path) -> None:
        self._handle = open(path, "wb")  # noqa: SIM115 - closed by close() / abort()

    def write(self, chunk: Any) -> None:
        data = chunk() if callable(chunk) else chunk
        self._handle.write(memoryview(np.ascontiguousarray(data) if isinstance(data, np.ndarray) else data).cast("B"))

    def close(self) -> None:
        self._handle.close()

    def abort(self) -> None:
        self._handle.close()


#: Opens the external-data file of a graph: the sink its weights stream into.
OpenSink = Callable[[Path], DataSink]


class ExternalDataWriter:
    """Appends raw tensors to one data file and returns initializers that reference them.

    Offsets and lengths follow from the shapes alone, so an initializer is complete when its chunks
    are handed to the sink, before they are converted or written; the byte counts are checked as
    the chunks are converted, and a mismatch is raised by :meth:`close`.
    """

    def __init__(self, directory: Path, open_sink: OpenSink = PlainFile) -> None:
        self.location = EXTERNAL_DATA_FILE
        self._sink = open_sink(Path(directory) / self.location)
        self._offset = 0
        self.bytes_written = 0
        self._lock = threading.Lock()
        self._counted: dict[str, int] = {}
        self._expected: dict[str, tuple[int, tuple[int, ...]]] = {}

    def _count(self, name: str, dtype: np.dtype, data: np.ndarray) -> np.ndarray:
        data = np.ascontiguousarray(data, dtype=dtype)
        with self._lock:
            self._counted[name] = self._counted.get(name, 0) + data.nbytes
        return data

    def add_chunks(
        self,
        name: str,
        dtype: np.dtype,
        shape: tuple[int, ...],
        chunks: Iterable[np.ndarray | Callable[[], np.ndarray]],
        *,
        elem_type: int | None = None,
        dims: tuple[int, ...] | None = None,
    ) -> TensorProto:
        """Write a tensor whose row-major data arrives in chunks, each an array or a conversion producing one.

        ``elem_type`` overrides the ONNX type for data handed over as raw bytes of
        another NumPy dtype (float8 weights arrive as uint8); ``dims`` overrides the
        ONNX shape where it differs from the bytes' ``shape`` (two FP4 codes per byte).
        """
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape)) * dtype.itemsize
        align = _PAGE_ALIGN if nbytes >= _PAGE_ALIGN_THRESHOLD else _SMALL_ALIGN
        pad = -self._offset % align
        if pad:
            self._sink.write(b"\0" * pad)
            self._offset += pad
        self._expected[name] = (nbytes, tuple(shape))
        self._counted.setdefault(name, 0)
        for chunk in chunks:
            if callable(chunk):
                self._sink.write(lambda convert=chunk: self._count(name, dtype, convert()))
            else:
                self._sink.write(self._count(name, dtype, chunk))
        tensor = TensorProto(name=name, data_type=elem_type or NP_TO_ONNX[dtype], dims=list(dims or shape))
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.location), ("offset", self._offset), ("length", nbytes)):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, str(value)
        self._offset += nbytes
        self.bytes_written += nbytes
        return tensor

    def close(self) -> None:
        """Finish writing; raises if a tensor's chunks did not add up to its shape."""
        self._sink.close()
        for name, (nbytes, shape) in self._expected.items():
            if self._counted[name] != nbytes:
                raise ValueError(
                    f"tensor {name!r}: got {self._counted[name]} bytes for shape {shape}, expected {nbytes}"
                )

    def abort(self) -> None:
        self._sink.abort()


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


def write_graph(
    directory: Path, build: Callable[[GraphBuilder], onnx.ModelProto], open_sink: OpenSink = PlainFile
) -> None:
    """``build`` a graph whose weights stream into ``directory``/onnx_model.data; save and check ``model.onnx``.

    ``open_sink`` opens that data file (a pipelined, hashing one for an export step).
    """
    writer = ExternalDataWriter(directory, open_sink)
    try:
        model = build(GraphBuilder(writer))
    except BaseException:
        writer.abort()
        raise
    writer.close()
    log.info("wrote %.1f MB of weights to %s", writer.bytes_written / 1e6, EXTERNAL_DATA_FILE)
    onnx.save_model(model, str(Path(directory) / ONNX_NAME))
    onnx.checker.check_model(str(Path(directory) / ONNX_NAME))
