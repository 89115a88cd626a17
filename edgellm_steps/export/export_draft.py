"""export-draft: an EAGLE3 draft checkpoint (published layout) -> the Edge-LLM draft ONNX directory.

Output (contract section 5): ``model.onnx`` + ``onnx_model.data``, ``config.json`` (the
section 4 keys plus ``draft_vocab_size`` and ``base_model_hidden_size``, ``model_type``
``eagle3_draft``, no ``vocab_size``), ``d2t.safetensors`` (int32 offsets: base id = draft id +
d2t[draft id]) and our ``manifest.json``. There is no embedding file: the runtime looks the
draft's tokens up in the base's table. The base checkpoint is read for its config only: the
draft must fit it (hidden size of the states it consumes, vocabulary its d2t maps into).
"""

from __future__ import annotations

import logging
import time
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from edgellm_steps.artifacts import steps
from edgellm_steps.artifacts.atomic import staged_directory
from edgellm_steps.artifacts.checkpoint import DecoderDims, decoder_dims
from edgellm_steps.artifacts.draft_weights import open_draft_store
from edgellm_steps.artifacts.manifest import write_manifest
from edgellm_steps.artifacts.sources import read_hf_config, resolve_source
from edgellm_steps.artifacts.streamed_file import StreamedFile, available_cores
from edgellm_steps.export.draft_graph import DraftGraph
from edgellm_steps.export.sidecars import runtime_config, write_json
from edgellm_steps.graph.onnx_builder import ONNX_NAME, write_graph
from edgellm_steps.models.eagle import check_d2t, check_draft_fits
from edgellm_steps.models.families import EAGLE3_DRAFT
from edgellm_steps.quant.checkpoint_record import open_checkpoint
from edgellm_steps.quant.prequantized import held_precision
from edgellm_steps.quant.quant_plan import QuantPlan

log = logging.getLogger(__name__)

D2T_FILE = "d2t.safetensors"


def read_d2t(store: Any, draft_vocab: int, base_vocab: int, where: str) -> np.ndarray:
    """The draft-to-base offsets as int32, checked (:func:`~edgellm_steps.models.eagle.check_d2t`)."""
    tensor = store.get("d2t") if "d2t" in store else None
    dtype = None if tensor is None else str(tensor.dtype).removeprefix("torch.")
    return check_d2t(lambda: tensor.numpy(), dtype, draft_vocab, base_vocab, where)


def draft_config_json(dims: DecoderDims, draft_config: dict[str, Any], target: int, draft_vocab: int) -> dict:
    """The draft's ``config.json``: section 4's keys, no ``vocab_size``, the draft's own keys."""
    config = runtime_config(dims, EAGLE3_DRAFT, draft_config)
    del config["vocab_size"]
    config["model_type"] = "eagle3_draft"
    config["draft_vocab_size"] = draft_vocab
    config["base_model_hidden_size"] = 3 * target
    return config


def export_draft(
    draft_dir: str | Path, base_dir: str | Path, output_dir: str | Path, *, threads: int | None = None
) -> Path:
    """Export the EAGLE3 draft ``draft_dir`` for the base ``base_dir`` into ``output_dir``.

    The weights stream to disk as export-llm's do (converted on ``threads`` threads, default every core
    this process may use; hashed as written).
    """
    from safetensors.numpy import save_file

    started = time.monotonic()
    draft = resolve_source(str(draft_dir), allow_download=True)
    base = open_checkpoint(base_dir)
    draft_config, base_config = read_hf_config(draft), base.hf_config
    target, draft_vocab = check_draft_fits(draft_config, base_config, str(draft))
    dims = decoder_dims(draft_config)
    EAGLE3_DRAFT.check_dims(dims)
    store = open_draft_store(draft)
    quant = QuantPlan.from_held(held_precision(draft, draft_config), "lm_head")
    quant.check_tensors(store, str(draft))
    d2t = read_d2t(store, draft_vocab, base.dims.vocab_size, str(draft))
    output_dir = Path(output_dir)
    log.info(
        "exporting the EAGLE3 draft %s (%s, draft vocabulary %d) to %s", draft, quant.precision, draft_vocab, output_dir
    )
    with staged_directory(output_dir) as staging:
        write_graph(
            staging,
            lambda builder: DraftGraph(
                builder,
                store,
                EAGLE3_DRAFT,
                dims,
                quant,
                target_hidden_size=target,
                draft_vocab_size=draft_vocab,
            ).build(),
            partial(StreamedFile, threads=threads or available_cores()),
        )
        write_json(staging / "config.json", draft_config_json(dims, draft_config, target, draft_vocab))
        save_file({"d2t": d2t}, str(staging / D2T_FILE))
        write_manifest(staging, step=steps.EXPORT_DRAFT, parameters={"precision": quant.precision})
    log.info("draft export finished in %.1f s", time.monotonic() - started)
    return output_dir / ONNX_NAME
