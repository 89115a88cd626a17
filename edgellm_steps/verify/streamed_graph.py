"""Running an exported LLM graph one decoder layer at a time, with only that layer's weights in memory.

``onnx.reference`` holds every initializer of a graph at once: an 8B export's 16 GB. The exporter names
each node after its module (``/model/layers.<i>/...``), so the graph splits into segments: what comes
before the first layer, each decoder layer, and the rest (final norm, LM head). Each segment runs as its
own small graph whose weights are read from ``onnx_model.data`` by offset just before it runs and dropped
after; tensors pass between segments by name and are dropped after their last reader. The arithmetic is
the same ops on the same arrays in the same order, so the outputs equal the whole graph's bit for bit.

:class:`StreamedGraph` answers the two things :class:`~edgellm_steps.verify.reference.LLMRunner` asks of
``onnx.reference.ReferenceEvaluator``: ``proto_`` (the graph, its inputs and outputs) and ``run``. Segments also
expose what the whole graph hides: after a run, :attr:`StreamedGraph.layer_outputs` holds each decoder layer's
output hidden states (the residual stream the next layer reads), for the accuracy report's per-layer error.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

#: Element types whose stored bytes are their numpy array's (little-endian, unpacked).
_PLAIN = {
    t: helper.tensor_dtype_to_np_dtype(t)
    for t in (
        TensorProto.FLOAT,
        TensorProto.FLOAT16,
        TensorProto.INT8,
        TensorProto.UINT8,
        TensorProto.INT32,
        TensorProto.INT64,
    )
}

#: The segment of a node: its decoder layer's index, from the exporter's node names.
_LAYER = re.compile(r"^/model/layers\.(\d+)/")


def _segment_keys(nodes) -> list[str]:
    """Per node: ``head`` before the first layer, ``layer <i>``, then ``tail`` after the last one."""
    keys, seen_layer = [], False
    for node in nodes:
        match = _LAYER.match(node.name)
        if match:
            seen_layer = True
            keys.append(f"layer {int(match.group(1))}")
        else:
            keys.append("tail" if seen_layer else "head")
    return keys


class _Segment:
    """One segment: its nodes as a graph whose inputs are what it reads (weights included) and whose outputs
    are what later segments or the graph's outputs read."""

    def __init__(
        self, key: str, nodes: list, model: onnx.ModelProto, wanted_later: set[str], graph_outputs: set[str]
    ) -> None:
        produced = {name for node in nodes for name in node.output if name}
        read = [name for node in nodes for name in node.input if name and name not in produced]
        self.key = key
        self.reads = list(dict.fromkeys(read))
        self.writes = [name for node in nodes for name in node.output if name in wanted_later]
        #: What the next segment reads of this one that is no graph output: for a decoder layer, its hidden states
        #: (the last such tensor written: the residual sum the layer ends with).
        self.passed_on = [name for name in self.writes if name not in graph_outputs]
        graph = helper.make_graph(
            nodes,
            key,
            [helper.make_empty_tensor_value_info(name) for name in self.reads],
            [helper.make_empty_tensor_value_info(name) for name in self.writes],
        )
        self.model = helper.make_model(graph, opset_imports=list(model.opset_import), ir_version=model.ir_version)


class StreamedGraph:
    """An exported graph run segment by segment, each segment's weights read from disk when it runs."""

    def __init__(self, path: Path, new_ops: list) -> None:
        path = Path(path)
        self.proto_ = onnx.load(str(path), load_external_data=False)
        self._directory = path.parent
        self._new_ops = new_ops
        self._initializers = {t.name: t for t in self.proto_.graph.initializer}
        nodes = list(self.proto_.graph.node)
        outputs = {o.name for o in self.proto_.graph.output}
        # Segments are runs of consecutive nodes with one key, so they run in the graph's (topological) order
        # even where a node named after one layer sits among another's (a run of its own then).
        runs: list[tuple[str, list]] = []
        for node, key in zip(nodes, _segment_keys(nodes), strict=True):
            if runs and runs[-1][0] == key:
                runs[-1][1].append(node)
            else:
                runs.append((key, [node]))
        self._segments: list[_Segment] = []
        for position, (key, run) in enumerate(runs):
            later = {name for _, r in runs[position + 1 :] for n in r for name in n.input} | outputs
            self._segments.append(_Segment(key, run, self.proto_, later, outputs))
        #: The last segment reading each tensor: after it runs, the tensor is dropped.
        self._last_reader = {name: i for i, segment in enumerate(self._segments) for name in segment.reads}
        self._output_names = outputs
        #: Each decoder layer's output hidden states of the last run, in layer order: the first
        #: :attr:`layer_rows` positions of each sequence (a copy: the rest is freed; 0 keeps none, None all).
        self.layer_outputs: list[np.ndarray] = []
        self.layer_rows: int | None = 0

    def _weight(self, name: str) -> np.ndarray:
        """An initializer's value, its bytes read from the external data file only now.

        A plain numeric tensor is read straight into its array (one copy: an 8B LM head is 1 GB); a packed or
        8-bit float one goes through ``numpy_helper``, which unpacks it (three transient copies of a smaller
        tensor).
        """
        tensor = self._initializers[name]
        if not onnx.external_data_helper.uses_external_data(tensor):
            return numpy_helper.to_array(tensor)
        info = onnx.external_data_helper.ExternalDataInfo(tensor)
        with open(self._directory / info.location, "rb") as handle:
            handle.seek(info.offset or 0)
            if tensor.data_type in _PLAIN:
                count = int(np.prod(tensor.dims, dtype=np.int64))
                return np.fromfile(handle, _PLAIN[tensor.data_type], count).reshape(tuple(tensor.dims))
            data = handle.read(info.length) if info.length else handle.read()
        inline = TensorProto()
        inline.CopyFrom(tensor)
        del inline.external_data[:]
        inline.data_location = TensorProto.DEFAULT
        inline.raw_data = data
        return numpy_helper.to_array(inline)

    def run(self, names: Any, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Every graph output, in the graph's order (``names`` must be None, as LLMRunner passes it).

        The caller hands ``feeds`` over: each fed tensor is removed from it after the last segment that reads it
        (an 8B export's past KV caches are 0.27 GB at 2k tokens; the new ones replace them layer by layer).
        """
        if names is not None:
            raise ValueError("a streamed graph returns every output")
        live = dict(feeds)
        by_layer: dict[str, np.ndarray] = {}
        for index, segment in enumerate(self._segments):
            inputs = {name: live[name] if name in live else self._weight(name) for name in segment.reads}
            results = ReferenceEvaluator(segment.model, new_ops=self._new_ops).run(None, inputs)
            live.update(zip(segment.writes, results, strict=True))
            if segment.key.startswith("layer ") and segment.passed_on and self.layer_rows != 0:
                by_layer[segment.key] = live[segment.passed_on[-1]][:, : self.layer_rows].copy()
            for name in segment.reads:
                if self._last_reader[name] == index and name not in self._output_names:
                    live.pop(name, None)
                    feeds.pop(name, None)
        self.layer_outputs = list(by_layer.values())
        return [live[o.name] for o in self.proto_.graph.output]
