"""Running exported LLM graphs on the CPU, with real implementations of the plugin ops.

``onnx.reference`` executes the standard ops; :data:`REFERENCE_OPS` supplies the
``trt`` domain ops. The runner keeps the KV caches between calls, so a test can
drive prefill, chunked prefill and decode steps like the runtime does.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from onnx import helper
from onnx.reference import ReferenceEvaluator
from onnx.reference.op_run import OpRun
from safetensors.numpy import load_file

from edgellm_steps.artifacts.safetensors_io import SafetensorsFile
from edgellm_steps.export import llm_io
from edgellm_steps.graph.onnx_builder import ONNX_NAME
from edgellm_steps.plugins import REFERENCE_OPS
from edgellm_steps.verify.streamed_graph import StreamedGraph


class MatMul(OpRun):
    """``onnx.reference``'s MatMul, float16 operands multiplied in float32 and rounded once to float16.

    numpy's own float16 matmul also accumulates in float (and TensorRT's float16 GEMMs accumulate in float32),
    but in a loop of its own: a 256 x 4096 x 4096 product takes 30 s. Through float32 BLAS it takes 0.1 s; the
    sums differ only in their order, so a result lands at most one float16 step apart.
    """

    op_domain = ""
    #: Columns of a weight cast to float32 at a time: an 8B LM head whole would take 2.1 GB more, 4096 of its
    #: columns 67 MB.
    COLUMNS = 4096

    def _run(self, a, b):
        if a.dtype != np.float16 or b.dtype != np.float16:
            return (np.matmul(a, b),)
        left = a.astype(np.float32)
        if b.ndim != 2 or b.shape[1] <= MatMul.COLUMNS:
            return (np.matmul(left, b.astype(np.float32)).astype(np.float16),)
        out = np.empty((*a.shape[:-1], b.shape[1]), np.float16)
        for first in range(0, b.shape[1], MatMul.COLUMNS):
            part = slice(first, first + MatMul.COLUMNS)
            out[..., part] = np.matmul(left, b[:, part].astype(np.float32))
        return (out,)


#: What an LLM graph runs with: the plugin ops, and the float16 GEMMs through BLAS.
LLM_OPS = [*REFERENCE_OPS, MatMul]


def lora_feeds(inputs, adapter: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Feeds for a graph's LoRA inputs: the adapter's tensors by name, rank 0 for the rest.

    A tensor the graph has no input for is an error here (the runtime would silently ignore it).
    """
    feeds: dict[str, np.ndarray] = {}
    for value in inputs:
        dims = value.type.tensor_type.shape.dim
        if len(dims) != 2 or not any(llm_io.is_lora_rank(d.dim_param) for d in dims if d.dim_param):
            continue
        if value.name in adapter:
            feeds[value.name] = np.asarray(adapter[value.name], np.float16)
        else:
            feeds[value.name] = np.zeros([0 if d.dim_param else d.dim_value for d in dims], np.float16)
    if unknown := sorted(set(adapter) - set(feeds)):
        raise ValueError(f"adapter tensor {unknown[0]} is no LoRA input of the graph")
    return feeds


class LLMRunner:
    """Feeds an exported LLM directory the way the runtime does: embeddings in, logits out."""

    def __init__(
        self,
        onnx_dir: Path,
        rope_table: np.ndarray,
        *,
        batch: int,
        capacity: int,
        graph: str = ONNX_NAME,
        lora: dict[str, np.ndarray] | None = None,
        streamed: bool = False,
    ) -> None:
        """``graph`` names the ONNX file to run; a LoRA graph (``lora_model.onnx``) gets ``lora``'s tensors
        (a processed adapter) and, for every LoRA input the adapter lacks, rank 0, as the runtime binds it.
        ``streamed`` runs it one decoder layer at a time (:mod:`streamed_graph`: the same outputs, one layer's
        weights in memory) and reads only the embedding rows its tokens use."""
        onnx_dir = Path(onnx_dir)
        self.config = json.loads((onnx_dir / "config.json").read_text())
        table = onnx_dir / "embedding.safetensors"
        if streamed:
            self.embedding = SafetensorsFile(table).mapped_array("embedding")
            self.session = StreamedGraph(onnx_dir / graph, LLM_OPS)
        else:
            self.embedding = load_file(str(table))["embedding"]
            self.session = ReferenceEvaluator(str(onnx_dir / graph), new_ops=LLM_OPS)
        self.lora = lora_feeds(self.session.proto_.graph.input, lora or {})
        self.rope = rope_table.astype(np.float32)
        layers, hkv, d = (self.config[k] for k in ("num_hidden_layers", "num_key_value_heads", "head_dim"))
        past = next(i for i in self.session.proto_.graph.input if i.name == llm_io.past_name(0))
        cache_dtype = helper.tensor_dtype_to_np_dtype(past.type.tensor_type.elem_type)
        self._cache = ((batch, 2, hkv, capacity, d), cache_dtype, layers)
        self.caches = [np.zeros(self._cache[0], cache_dtype) for _ in range(layers)]
        self.lengths = np.zeros(batch, np.int32)
        #: An EAGLE base graph takes tree inputs and returns the hidden states of every new token.
        self.eagle = any(i.name == llm_io.ATTENTION_POS_ID for i in self.session.proto_.graph.input)
        #: A Qwen3-VL graph's deepstack inputs, in order.
        self.deepstack_inputs = [
            i.name for i in self.session.proto_.graph.input if i.name.startswith(llm_io.DEEPSTACK_PREFIX)
        ]
        self.hidden_states: np.ndarray | None = None

    def reset(self) -> None:
        """Empty the KV caches: the next step starts new sequences (the graph stays loaded)."""
        shape, dtype, layers = self._cache
        self.caches = [np.zeros(shape, dtype) for _ in range(layers)]
        self.lengths = np.zeros_like(self.lengths)

    def step(
        self,
        token_ids: list[list[int]],
        *,
        all_logits: bool = False,
        embeds: np.ndarray | None = None,
        tree: tuple[np.ndarray, np.ndarray] | None = None,
        deepstack: list[np.ndarray] | None = None,
    ) -> np.ndarray:
        """Append ``token_ids[b]`` to sequence b (ragged lists are right-padded); returns float32 logits.

        With ``all_logits`` the logits of every new token are returned ([B, S, V]),
        otherwise those of each sequence's last new token ([B, 1, V]).
        ``embeds`` ([B, S, H], cast to float16) replaces the embedding lookup of the
        padded ids, as the runtime feeds a VLM: image embeddings spliced into the text's.
        ``tree`` = (``attention_pos_id`` [B, S], bit-packed ``attention_mask`` [B, S, words]) makes
        the new tokens a speculation tree (EAGLE base); without it an EAGLE graph gets the
        runtime's one-entry placeholders and attends causally. An EAGLE graph's
        ``hidden_states`` output is kept in :attr:`hidden_states`. A Qwen3-VL graph's deepstack
        inputs get ``deepstack`` ([B, S, H] each: the tower's rows at image tokens, zeros elsewhere),
        or zeros, as the runtime binds them for text and on decode steps.
        """
        batch = len(token_ids)
        seq = max(len(t) for t in token_ids)
        ids = np.zeros((batch, seq), np.int64)
        for b, tokens in enumerate(token_ids):
            ids[b, : len(tokens)] = tokens
        counts = np.array([len(t) for t in token_ids], np.int32)
        start = self.lengths.copy()
        if all_logits:
            last = np.tile(np.arange(seq, dtype=np.int64), (batch, 1))
        else:
            last = (counts - 1).astype(np.int64)[:, None]
        if embeds is None:
            inputs = self.embedding[ids].astype(np.float16)
        else:
            inputs = np.asarray(embeds).astype(np.float16)
            if inputs.shape != (batch, seq, self.embedding.shape[-1]):
                raise ValueError(f"embeds {inputs.shape} do not match the tokens: ({batch}, {seq}, hidden)")
        feeds = {
            llm_io.INPUTS_EMBEDS: inputs,
            llm_io.ROPE_COS_SIN: self.rope,
            llm_io.CONTEXT_LENGTHS: (start + counts).astype(np.int32),
            llm_io.LAST_TOKEN_IDS: last,
            # An empty start index means a plain prefill into an empty cache.
            llm_io.KVCACHE_START_INDEX: start if start.any() else np.zeros(0, np.int32),
        }
        # The caches are handed to the graph (a streamed one drops each after its layer): the runner keeps none.
        caches, self.caches = self.caches, []
        for i, cache in enumerate(caches):
            feeds[llm_io.past_name(i)] = cache
        del caches
        feeds.update(self.lora)
        for i, name in enumerate(self.deepstack_inputs):
            given = None if deepstack is None else np.asarray(deepstack[i], np.float16)
            feeds[name] = given if given is not None else np.zeros_like(inputs)
        if self.eagle:
            pos_ids, mask = tree if tree is not None else (np.zeros((batch, 1)), np.zeros((batch, 1, 1)))
            feeds[llm_io.ATTENTION_POS_ID] = np.asarray(pos_ids, np.int32)
            feeds[llm_io.ATTENTION_MASK] = np.asarray(mask, np.int32)
        elif tree is not None:
            raise ValueError("tree inputs need an EAGLE base graph (export-llm --is_eagle_base)")
        outputs = self.session.run(None, feeds)
        names = [o.name for o in self.session.proto_.graph.output]
        result = dict(zip(names, outputs, strict=True))
        self.caches = [result[llm_io.present_name(i)] for i in range(self._cache[2])]
        self.lengths = start + counts
        self.hidden_states = result.get(llm_io.HIDDEN_STATES)
        return result[llm_io.LOGITS]
