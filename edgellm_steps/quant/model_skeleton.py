"""A checkpoint's model as a skeleton whose parts are given their weights one at a time.

The model is built from its config with every parameter on the meta device (buffers such as the
rope tables real), so its own forward can make each decoder layer's inputs exactly as a whole-model
run does, while a part's weights are read from the shards only when that part is calibrated
(``layerwise.py``) and dropped after. It knows which stored tensor feeds each parameter (through the
family's load-time renaming) and the name ``save_pretrained`` would write each tensor under.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgellm_steps.artifacts.checkpoint import TensorStore, decoder_dims
from edgellm_steps.artifacts.sources import read_hf_config
from edgellm_steps.errors import SourceError

#: Rows converted to the calibration dtype at a time when a stored tensor is cast.
CAST_ROWS = 4096


class _Recorded(Exception):
    """Raised by the last layer's recorder: every layer's call has been captured, the forward may stop."""


@dataclass
class LayerCall:
    """What one decoder layer is called with, besides its hidden states (per calibration batch)."""

    args: tuple
    kwargs: dict


@dataclass
class Stage:
    """A unit of calibration: modules (by whole-model name) and how the cached states run through them."""

    name: str
    modules: dict[str, Any]
    run: Callable[[Any, int], Any]


def skeleton(checkpoint: Path, auto_class: Any, dtype: Any) -> Any:
    """The model of ``checkpoint``'s config with every parameter on the meta device (buffers real)."""
    import transformers
    from accelerate import init_empty_weights

    config = transformers.AutoConfig.from_pretrained(str(checkpoint))
    with init_empty_weights(include_buffers=False):
        model = auto_class.from_config(config, dtype=dtype)
    return model.eval()


def module_name(name: str, keys: set[str], renames: tuple[tuple[str, str], ...]) -> str:
    """The model's name for stored tensor ``name``, through the family's load-time renaming."""
    if name in keys:
        return name
    for stored, module in renames:
        if name.startswith(stored) and module + name.removeprefix(stored) in keys:
            return module + name.removeprefix(stored)
    return name


def stored_names(model: Any, store: TensorStore, renames: tuple[tuple[str, str], ...]) -> dict[str, str]:
    """Model parameter name -> stored tensor name, through the family's load-time renaming."""
    keys = set(model.state_dict())
    return {module_name(name, keys, renames): name for name in store.names()}


def _row_embedding(rows: Any, ids: Any) -> Any:
    """A stand-in for the input embedding holding only ``rows``, the table's rows of token ``ids``."""
    import torch

    class RowEmbedding(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rows = rows
            self.lookup = torch.full((int(ids.max()) + 1,), -1, dtype=torch.long)
            self.lookup[ids] = torch.arange(len(ids))

        def forward(self, input_ids):
            return self.rows[self.lookup[input_ids]]

    return RowEmbedding()


class ModelSkeleton:
    """The skeleton of a checkpoint's model and its calibration stages, materialized one at a time."""

    def __init__(
        self, checkpoint: Path, auto_class: Any, renames: tuple[tuple[str, str], ...], dtype: Any, device: str
    ):
        import torch

        self.checkpoint, self.dtype, self.device = checkpoint, dtype, device
        self.store = TensorStore(checkpoint)
        self.model = skeleton(checkpoint, auto_class, dtype)
        for module in self.model.modules():  # the real buffers (rope tables) go where the states are computed
            for name, buffer in module._buffers.items():
                if buffer is not None and buffer.device.type != "meta":
                    module._buffers[name] = buffer.to(device)
        self.names = {id(module): name for name, module in self.model.named_modules()}
        self.stored = stored_names(self.model, self.store, renames)
        #: Module path prefix -> one loaded tensor under it (how a new tensor there is renamed on saving).
        self._under_prefix: dict[str, str] = {}
        for loaded in self.stored:
            parts = loaded.split(".")
            for cut in range(1, len(parts)):
                self._under_prefix.setdefault(".".join(parts[:cut]) + ".", loaded)
        decoder = self.model.get_decoder()
        self.layers = decoder.layers
        self.norm = decoder.norm
        self.lm_head = self.model.get_output_embeddings()
        # Tied as transformers 5 ties them: a composite config (InternVL) may say so at its top level only.
        self.tied = decoder_dims(read_hf_config(checkpoint)).tie_word_embeddings
        self._torch = torch

    def name_of(self, module: Any) -> str:
        return self.names[id(module)]

    # -- weights ------------------------------------------------------------------------------------------------

    def _stored_name(self, name: str) -> str:
        if name not in self.stored and self.tied and name == f"{self.name_of(self.lm_head)}.weight":
            name = f"{self.name_of(self.model.get_input_embeddings())}.weight"
        if name not in self.stored:
            raise SourceError(f"{self.checkpoint}: no stored tensor for {name}; is the checkpoint whole?")
        return self.stored[name]

    def _cast_tensor(self, name: str):
        """Stored tensor ``name`` in the calibration dtype, converted a block of rows at a time (an 8B model's
        embedding table is 1 GB stored and 2 GB in float32: never both whole at once)."""
        stored = self._stored_name(name)
        shape = self.store.shape(stored)
        if len(shape) < 2:
            return self.store.get(stored).to(self.dtype)
        out = self._torch.empty(shape, dtype=self.dtype)
        row = 0
        for chunk in self.store.row_chunks(stored, CAST_ROWS):
            out[row : row + len(chunk)] = chunk
            row += len(chunk)
        return out

    def _rows(self, name: str, ids: Any):
        """Rows ``ids`` (sorted, unique) of stored matrix ``name`` in the calibration dtype, read a block at a time."""
        stored = self._stored_name(name)
        out = self._torch.empty((len(ids), self.store.shape(stored)[1]), dtype=self.dtype)
        start = 0
        for chunk in self.store.row_chunks(stored, CAST_ROWS):
            inside = (ids >= start) & (ids < start + len(chunk))
            out[inside] = chunk[ids[inside] - start].to(self.dtype)
            start += len(chunk)
        return out

    def materialize(self, module: Any) -> None:
        """Give ``module``'s meta parameters their stored values, cast to the calibration dtype."""
        from accelerate.utils import set_module_tensor_to_device

        prefix = self.name_of(module)
        for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
            if tensor.device.type != "meta":
                continue
            value = self._cast_tensor(f"{prefix}.{name}")
            set_module_tensor_to_device(module, name, self.device, value=value)

    def release(self, module: Any) -> None:
        """Return ``module``'s parameters to the meta device, freeing their memory."""
        module.to("meta")

    def saved_name(self, name: str) -> str:
        """The name ``save_pretrained`` writes model tensor ``name`` under: the name it was loaded from (the
        family's load-time renaming reverted); a new tensor (a quantizer's) follows its module's renaming."""
        if name in self.stored:
            return self.stored[name]
        parts = name.split(".")
        for cut in range(len(parts) - 1, 0, -1):
            prefix = ".".join(parts[:cut]) + "."
            loaded = self._under_prefix.get(prefix)
            if loaded is not None:
                suffix = loaded.removeprefix(prefix)
                return self.stored[loaded].removesuffix(suffix) + name.removeprefix(prefix)
        return name

    def passthrough_tensors(self, claimed: set[str]) -> Iterator[tuple[str, Any]]:
        """Every model tensor no stage holds, as stored (save_pretrained's names): nothing changed them, so they are
        not cast to the calibration dtype (an 8B model's embedding table would be 2 GB in float32)."""
        for name in self.model.state_dict():
            if name in claimed or (self.tied and name == f"{self.name_of(self.lm_head)}.weight"):
                continue
            yield name, self.store.get(self._stored_name(name))

    # -- the states each stage runs on ---------------------------------------------------------------------------

    def embedded(self, batches: list) -> list:
        """The input embeddings of ``batches``, from the rows those tokens use."""
        torch = self._torch
        embedding = self.model.get_input_embeddings()
        ids = torch.unique(torch.cat([b.reshape(-1) for b in batches]))
        rows = self._rows(f"{self.name_of(embedding)}.weight", ids).to(self.device)
        self.model.set_input_embeddings(_row_embedding(rows, ids))
        try:
            return [self.model.get_input_embeddings()(b.to(self.device)) for b in batches]
        finally:
            self.model.set_input_embeddings(embedding)

    def layer_calls(self, batches: list) -> list[list[LayerCall]]:
        """What each decoder layer is called with, per batch: the model's own forward, every layer a recorder."""
        torch = self._torch
        calls: list[list[LayerCall]] = [[] for _ in self.layers]
        originals = list(self.layers)
        embedding = self.model.get_input_embeddings()
        ids = torch.unique(torch.cat([b.reshape(-1) for b in batches]))
        rows = torch.zeros((len(ids), embedding.embedding_dim), dtype=self.dtype, device=self.device)
        last = len(originals) - 1

        class Recorder(torch.nn.Module):
            def __init__(self, index: int, original: Any) -> None:
                super().__init__()
                self.index = index
                self.attention_type = getattr(original, "attention_type", None)

            def forward(self, hidden_states, *args, **kwargs):
                calls[self.index].append(LayerCall(args, kwargs))
                if self.index == last:
                    raise _Recorded
                return hidden_states

        for index, original in enumerate(originals):
            self.layers[index] = Recorder(index, original)
        self.model.set_input_embeddings(_row_embedding(rows, ids))
        try:
            with torch.no_grad():
                for batch in batches:
                    try:
                        self.model(input_ids=batch.to(self.device), use_cache=False)
                    except _Recorded:
                        continue
                    raise SourceError(f"{self.checkpoint}: the model's forward never reached its last decoder layer")
        finally:
            for index, original in enumerate(originals):
                self.layers[index] = original
            self.model.set_input_embeddings(embedding)
        return calls

    def float_states(self, batches: list, picks: set[int]) -> dict[int, list]:
        """Per batch, the hidden states transformers' ``output_hidden_states`` reports at each index of ``picks``
        (entry i < L: what decoder layer i is called with, 0 the embeddings; entry L: the final norm's output).
        Only the layers below the deepest pick run, in float, one at a time."""
        deepest, count = max(picks), len(self.layers)
        if not 0 <= min(picks) <= deepest <= count:
            raise SourceError(f"{self.checkpoint}: hidden states {sorted(picks)} asked of a model of {count} layers")
        states = self.embedded(batches)
        calls = self.layer_calls(batches)
        found: dict[int, list] = {}
        for index in range(deepest + 1):
            if index == count:  # the last entry is normed, as the decoder returns it
                self.materialize(self.norm)
                with self._torch.no_grad():
                    states = [self.norm(h) for h in states]
                self.release(self.norm)
            if index in picks:
                found[index] = states
            if index == deepest:
                break
            layer = self.layers[index]
            self.materialize(layer)
            stage = self.layer_stage(index, calls[index])
            with self._torch.no_grad():
                states = [stage.run(h, i) for i, h in enumerate(states)]
            calls[index] = []
            self.release(layer)
        return found

    # -- stages ----------------------------------------------------------------------------------------------------

    def layer_stage(self, index: int, calls: list[LayerCall]) -> Stage:
        layer = self.layers[index]

        def run(hidden, batch):
            call = calls[batch]
            out = layer(hidden, *call.args, **call.kwargs)
            return out[0] if isinstance(out, tuple) else out

        return Stage(self.name_of(layer), {self.name_of(layer): layer}, run)

    def head_stage(self) -> Stage:
        norm, head = self.norm, self.lm_head

        def run(hidden, batch):
            return head(norm(hidden))

        return Stage("head", {self.name_of(norm): norm, self.name_of(head): head}, run)

    def rest_stage(self) -> Stage:
        """Every other module (the embeddings, a vision tower), left on the meta device: ModelOpt converts them
        too (their quantizers belong in the whole model's state), and no recipe calibrates any of them. Its
        states are the batches' token ids."""
        staged = {id(m) for m in (*self.layers, self.norm, self.lm_head)}
        holders = {id(self.model)} | {id(m) for m in self.model.modules() if any(id(c) in staged for c in m.modules())}
        rest: dict[str, Any] = {}

        def visit(module: Any) -> None:
            for child in module.children():
                if id(child) in staged:
                    continue
                if id(child) in holders:
                    visit(child)
                else:
                    rest[self.name_of(child)] = child

        visit(self.model)
        embedding = self.model.get_input_embeddings()

        def run(ids, batch):
            # The whole-model forward runs the embedding (ModelOpt's disabled quantizers around it record the
            # dtype they saw); on the meta device this costs nothing and records the same.
            return embedding(ids.to("meta"))

        return Stage("rest", rest, run)
