"""export-llm: an HF decoder checkpoint -> the Edge-LLM ONNX directory (fp16).

Output (contract sections 3-4): ``model.onnx`` + ``onnx_model.data``,
``config.json``, ``embedding.safetensors``, ``tokenizer.json``,
``tokenizer_config.json``, ``processed_chat_template.json`` and our
``manifest.json``. Everything is written into a staging directory that replaces
``output_dir`` whole, in one rename, only when complete.
"""

from __future__ import annotations

import logging
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

from edgellm_steps.artifacts import steps
from edgellm_steps.artifacts.atomic import staged_directory
from edgellm_steps.artifacts.manifest import check_if_step_output, write_manifest
from edgellm_steps.artifacts.sources import resolve_source
from edgellm_steps.artifacts.streamed_file import StreamedFile, available_cores
from edgellm_steps.artifacts.tokenizer_files import EXPORT_TOKENIZER_FILES, copy_tokenizer_files
from edgellm_steps.export.chat_template import load_processed_chat_template, process_chat_template
from edgellm_steps.export.llm_graph import DecoderGraph
from edgellm_steps.export.sidecars import runtime_config, write_embedding, write_json
from edgellm_steps.export.vocab_map import VOCAB_MAP_FILE, load_vocab_map
from edgellm_steps.graph.onnx_builder import ONNX_NAME, write_graph
from edgellm_steps.models.eagle import check_eagle_base
from edgellm_steps.quant.checkpoint_record import open_checkpoint
from edgellm_steps.quant.exclusions import decoder_linears
from edgellm_steps.quant.gptq import check_gptq_config
from edgellm_steps.quant.quant_plan import QuantPlan
from edgellm_steps.quant.unified import open_tensors

log = logging.getLogger(__name__)


def _chat_template(checkpoint: Path, given: dict | None, vision_language: bool) -> dict:
    """The processed chat template: the one given, else derived from the checkpoint's tokenizer (which must load)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(checkpoint))
    return given if given is not None else process_chat_template(tokenizer, vision_language=vision_language)


def export_llm(
    model_dir: str | Path,
    output_dir: str | Path,
    *,
    chat_template: str | Path | None = None,
    eagle_base: bool = False,
    reduced_vocab_dir: str | Path | None = None,
    threads: int | None = None,
) -> Path:
    """Export ``model_dir`` (local directory or hub id) into ``output_dir``; returns the ONNX path.

    ``eagle_base`` writes the EAGLE3 base graph (contract 5): tree attention, ``last_token_ids``
    [B, N], the ``hidden_states`` output, ``model_type`` ``eagle3_base``. ``reduced_vocab_dir`` (a
    reduce-vocab output) keeps the lm_head rows of its ``vocab_map`` only: ``reduced_vocab_size`` in
    ``config.json``, the map copied beside the graph.

    Runs no model: weights are read tensor by tensor from the shards (by byte range)
    and written straight into the graph's external data, as a pipeline on ``threads`` threads
    (default: every core this process may use): the next layer is read while the current one is
    converted and the one before is written, and every large file is hashed as it is written.
    """
    started = time.monotonic()
    source = resolve_source(str(model_dir), allow_download=True)
    # A quantize-llm output must be whole before it is read: its files' names and sizes now, their bytes below.
    check_if_step_output(source, steps.QUANTIZE_LLM, contents=False)
    opened = open_checkpoint(source)
    checkpoint, hf_config, spec, dims, held = opened.path, opened.hf_config, opened.spec, opened.dims, opened.held
    if eagle_base:
        check_eagle_base(dims, str(checkpoint))
    given_template = load_processed_chat_template(Path(chat_template)) if chat_template else None
    store = open_tensors(checkpoint, held)
    spec = spec.resolved(store.names())
    if held is not None and held.gptq is not None:
        check_gptq_config(held.gptq, where=str(checkpoint))
    quant = QuantPlan.from_held(held, spec.lm_head.removesuffix(".weight"))
    quant.check_tensors(store, str(checkpoint))
    precision = quant.precision
    # Decoder Linears a quantized checkpoint left float (quantization.exclude): float16 GEMMs in the graph.
    float_linears = [m for m in decoder_linears(store, spec) if quant.weights and quant.linear_format(m, store) is None]
    vocab_map = load_vocab_map(reduced_vocab_dir, dims.vocab_size) if reduced_vocab_dir else None
    output_dir = Path(output_dir)
    log.info("exporting %s (%s, %d layers, %s) to %s", checkpoint, spec.family, dims.num_layers, precision, output_dir)
    threads = threads or available_cores()
    with (
        ThreadPoolExecutor(2, thread_name_prefix="export-side") as side,
        staged_directory(output_dir) as staging,
        store.reading_ahead(),
    ):
        # A quantize-llm output's manifest is checked (every byte hashed) while its weights are read, so that
        # the checkpoint comes from the disk once; nothing is committed unless the check passes. transformers'
        # import and the tokenizer take seconds of one core: they too run beside the weights.
        checked = side.submit(check_if_step_output, source, steps.QUANTIZE_LLM)
        template = side.submit(_chat_template, checkpoint, given_template, spec.vision_language)
        write_graph(
            staging,
            lambda builder: DecoderGraph(
                builder, store, spec, dims, quant, eagle_base=eagle_base, vocab_map=vocab_map
            ).build(),
            partial(StreamedFile, threads=threads),
        )
        write_embedding(store, spec, staging / "embedding.safetensors", threads=threads)
        config = runtime_config(dims, spec, hf_config, eagle_base=eagle_base)
        if vocab_map is not None:
            config["reduced_vocab_size"] = len(vocab_map)
            shutil.copyfile(Path(reduced_vocab_dir) / VOCAB_MAP_FILE, staging / VOCAB_MAP_FILE)
        write_json(staging / "config.json", config)
        copy_tokenizer_files(checkpoint, staging, EXPORT_TOKENIZER_FILES)
        write_json(staging / "processed_chat_template.json", template.result())
        checked.result()
        write_manifest(
            staging,
            step=steps.EXPORT_LLM,
            parameters={
                "precision": precision,
                "chat_template": str(chat_template) if chat_template else None,
                "eagle_base": eagle_base,
                "reduced_vocab_size": None if vocab_map is None else len(vocab_map),
                "float_linears": float_linears,
            },
        )
    log.info("export finished in %.1f s", time.monotonic() - started)
    return output_dir / ONNX_NAME
