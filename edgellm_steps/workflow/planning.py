"""What the workflow asks while it plans: settings, checks and inputs per target.

The Snakemake rules call these functions from input and params functions. They
raise :class:`~edgellm_steps.errors.EdgeLLMError` for anything a user can fix;
the workflow turns that into one line and stops before any job runs.
"""

from __future__ import annotations

import math
import shlex
from dataclasses import replace
from pathlib import Path
from typing import Any

import yaml

from edgellm_steps.artifacts.checkpoint import decoder_dims, weight_files
from edgellm_steps.artifacts.digests import DigestCache
from edgellm_steps.artifacts.draft_weights import draft_weight_files
from edgellm_steps.artifacts.sources import STATE_DIR, read_hf_config, refresh_stamps, resolve_source
from edgellm_steps.artifacts.tokenizer_files import check_tokenizer
from edgellm_steps.engine.limits import LIMITS_READ
from edgellm_steps.errors import ConfigError, PrecisionError, SourceError
from edgellm_steps.lora.adapter_fit import read_fitting_adapter
from edgellm_steps.models.eagle import check_draft_fits
from edgellm_steps.models.families import family_for
from edgellm_steps.quant.formats import FLOAT_WEIGHTS, FORMATS
from edgellm_steps.quant.gptq import check_gptq_config
from edgellm_steps.quant.precision import SM_FLOOR, Precision, check_sm_supports, parse_precision
from edgellm_steps.quant.prequantized import HeldPrecision, held_precision
from edgellm_steps.quant.recipes import calibration_batch_size
from edgellm_steps.quant.shape_checks import check_block_dims, check_draft_block_dims
from edgellm_steps.workflow import resources
from edgellm_steps.workflow.config import ModelSettings, load_schema, model_settings, validate_config

CONFIG_CANDIDATES = ("config.yaml", "config/config.yaml")
#: ``<model>+<adapter>``: the variant of a model with one of its ``merge: true`` adapters folded in.
VARIANT_SEPARATOR = "+"


def split_variant(model: str) -> tuple[str, str | None]:
    """(the configured model, the merged adapter or None) of a target's ``{model}``."""
    base, _, adapter = model.partition(VARIANT_SEPARATOR)
    return base, adapter or None


def load_workflow_config(config: dict[str, Any], workdir: Path = Path()) -> dict[str, Any]:
    """The config Snakemake loaded, or ``config.yaml`` found in the work directory; validated."""
    if not config.get("models") and "defaults" not in config:
        for candidate in CONFIG_CANDIDATES:
            path = workdir / candidate
            if path.is_file():
                with open(path, encoding="utf-8") as handle:
                    config = {**(yaml.safe_load(handle) or {}), **config}
                break
        else:
            raise ConfigError(
                "no configuration: pass --configfile <workdir>/config.yaml "
                "(example: config/config.yaml in the checkout) or put config.yaml in the work directory"
            )
    validate_config(config)
    return config


def _local_files(path: str) -> list[str]:
    """A local text file, or every file of a directory: inputs whose content decides a step's output."""
    found = Path(path)
    return [str(f) for f in sorted(found.rglob("*")) if f.is_file()] if found.is_dir() else [str(found)]


class Planner:
    """Answers the rules' questions about one validated config."""

    def __init__(self, config: dict[str, Any], state_dir: Path = STATE_DIR) -> None:
        self.config = config
        self.state_dir = state_dir
        self._schema = load_schema()
        # One DAG build asks about the same model for every job; resolve and read its source once.
        self._sources: dict[str, tuple[Path, dict[str, Any], HeldPrecision | None]] = {}
        self._stamps: dict[str, list[str]] = {}
        self._drafts: dict[str, Path] = {}
        #: model -> (the draft's precision, whether it needs the quantize-draft step)
        self._draft_precisions: dict[str, tuple[Precision, bool]] = {}
        self._adapters: dict[tuple[str, str], Path] = {}
        self._digests: DigestCache | None = None

    def settings(self, model: str) -> ModelSettings:
        """A model's settings; a merged variant's are its model's, with the merged checkpoint as source."""
        base, adapter = split_variant(model)
        settings = model_settings(self.config, base, self._schema)
        if adapter is None:
            return settings
        entry = settings.lora.get(adapter)
        if entry is None or not entry.merge:
            raise ConfigError(
                f"'{model}' is no merged variant: model '{base}' has no adapter '{adapter}' with merge: true; "
                f"add lora: {{{adapter}: {{source: <PEFT adapter>, merge: true}}}} under models.{base}"
            )
        return replace(settings, name=model, source=f"merged/{model}", lora={})

    def precision(self, model: str, text: str) -> Precision:
        self.settings(model)
        precision = parse_precision(text)
        return precision

    def _source(self, model: str) -> tuple[Path, dict[str, Any], HeldPrecision | None]:
        """The model's local checkpoint, its config.json and the precision it holds, checked.

        Everything a step would only find out after loading the model is checked here: the
        architecture, the tokenizer, which weight files the checkpoint has, and whether it is
        already quantized.
        """
        base, adapter = split_variant(model)
        if adapter is not None and model not in self._sources:
            self.adapter_checkpoint(base, adapter)
            _, hf_config, held = self._source(base)
            if held is not None:
                raise PrecisionError(
                    f"model '{base}' is already quantized as {held.precision}; adapter '{adapter}' merges into float "
                    "weights only: use an unquantized source or serve the adapter unmerged"
                )
            self._sources[model] = (Path(self.settings(model).source), hf_config, None)
        if model not in self._sources:
            settings = self.settings(model)
            where = f"model '{model}' ({settings.source})"
            path = resolve_source(settings.source, model=model)
            hf_config = read_hf_config(path, model=model)
            spec = family_for(hf_config, where=where)
            try:
                spec.check_dims(decoder_dims(hf_config))
                weight_files(path)
                check_tokenizer(path)
                held = held_precision(path, hf_config)
            except SourceError as err:
                raise SourceError(f"model '{model}': {err}") from err
            self._sources[model] = (path, hf_config, held)
        return self._sources[model]

    def checkpoint(self, model: str) -> Path:
        """The model's local checkpoint, checked to hold a supported architecture."""
        return self._source(model)[0]

    def check_source_fits(self, model: str, precision: Precision) -> None:
        """A pre-quantized source is exported as the precision it holds, and only as that one."""
        _, hf_config, held = self._source(model)
        where = f"model '{model}'"
        weights = FORMATS[precision.weights]
        if held is None:
            if not weights.made_here:
                raise PrecisionError(
                    f"{where}: {weights.name} exports a checkpoint already quantized with {weights.quant_method_label} "
                    f"(quantization_config.quant_method: {weights.quant_method}), and this one is not; "
                    f"use {weights.quantize_instead} to quantize it"
                )
        elif precision != held.precision:
            raise PrecisionError(
                f"{where}: the source is already quantized as {held.precision} ({held.origin}) and is never read as "
                f"fp16 or quantized again; request precision {held.precision} "
                f"(onnx/{model}_{held.precision}/llm/model.onnx)"
            )
        elif held.gptq is not None:
            check_gptq_config(held.gptq, where=where)
        check_block_dims(hf_config, precision, where=where)

    def source_inputs(self, model: str) -> list[str]:
        """The stamps standing for the model's source checkpoint (checked first); a merged variant's manifest."""
        if split_variant(model)[1] is not None:
            return [f"{self.checkpoint(model)}/manifest.json"]
        return self._stamps_of(model, self.checkpoint(model), self.state_dir / "sources" / model)

    def _stamps_of(self, key: str, checkpoint: Path, stamp_dir: Path) -> list[str]:
        """The stamps of ``checkpoint`` in ``stamp_dir``, refreshed once per plan (under ``key``)."""
        if key not in self._stamps:
            if self._digests is None:
                self._digests = DigestCache(self.state_dir / "digest-cache.json")
            self._stamps[key] = [str(p) for p in refresh_stamps(checkpoint, stamp_dir, self._digests)]
        return self._stamps[key]

    def quantized_manifest(self, model: str, precision: str) -> str | None:
        """The quantize step's manifest when ``precision`` needs that step, else None."""
        parsed = self.precision(model, precision)
        self.check_source_fits(model, parsed)
        if self._source(model)[2] is not None or not parsed.needs_quantize_step:
            return None
        return f"quantized/{model}_{precision}/manifest.json"

    def quantize_inputs(self, model: str, precision: str) -> dict[str, Any]:
        """Inputs of quantize_llm: the source stamps and a local calibration corpus."""
        if self.quantized_manifest(model, precision) is None:
            raise PrecisionError(f"precision '{precision}' has no quantize step: export the checkpoint directly")
        return {"source": self.source_inputs(model), **self._calibration_inputs(model)}

    def quantize_options(self, model: str, precision: str) -> str:
        """The quantize CLI flags that decide its output (recorded, so a change reruns the job)."""
        return self._quantize_flags(model, self.precision(model, precision))

    def _quantize_flags(self, model: str, parsed: Precision) -> str:
        """The precision and calibration flags quantize-llm and quantize-draft share."""
        quant = self.settings(model).quantization
        flags = [f"--precision {parsed}"]
        flags.append(f"--calib_size {quant.calib_size} --calib_max_tokens {quant.calib_max_tokens}")
        if quant.batch_size:
            flags.append(f"--calib_batch_size {quant.batch_size}")
        if quant.dataset:
            flags.append(f"--dataset_dir {shlex.quote(quant.dataset)}")
        return " ".join(flags)

    def _calibration_inputs(self, model: str) -> dict[str, Any]:
        dataset = self.settings(model).quantization.dataset
        return {"calibration": _local_files(dataset)} if dataset and Path(dataset).exists() else {}

    def export_inputs(self, model: str, precision: str) -> dict[str, Any]:
        """Inputs of export_llm: the quantized checkpoint's manifest or the source stamps, and a chat template."""
        quantized = self.quantized_manifest(model, precision)
        settings = self.settings(model)
        inputs: dict[str, Any] = {"quantized": quantized} if quantized else {"source": self.source_inputs(model)}
        if settings.chat_template:
            template = Path(settings.chat_template)
            if not template.is_file():
                raise ConfigError(
                    f"model '{model}': chat_template file '{template}' does not exist; fix chat_template in your config"
                )
            inputs["chat_template"] = str(template)
        if settings.reduced_vocab is not None:
            inputs["vocab_map"] = f"vocab/{model}/manifest.json"
        return inputs

    def reduce_vocab_inputs(self, model: str) -> dict[str, Any]:
        """Inputs of reduce_vocab: the source (its tokenizer), the draft (its d2t), a local corpus."""
        reduced = self.settings(model).reduced_vocab
        if reduced is None:
            raise ConfigError(
                f"model '{model}' has no reduced_vocab; add reduced_vocab: {{size: <ids to keep>}} under models.{model}"
            )
        inputs: dict[str, Any] = {"source": self.source_inputs(model)}
        if self.settings(model).draft is not None:
            inputs["draft"] = self.draft_source_inputs(model)
        if reduced.corpus and Path(reduced.corpus).exists():
            inputs["corpus"] = _local_files(reduced.corpus)
        return inputs

    def reduce_vocab_options(self, model: str) -> str:
        """The reduce-vocab flags that decide its output (recorded: a new size or corpus reruns it)."""
        reduced = self.settings(model).reduced_vocab
        flags = f"--reduced_vocab_size {reduced.size}"
        return flags + (f" --corpus {shlex.quote(reduced.corpus)}" if reduced.corpus else "")

    def vision_language(self, model: str) -> bool:
        """Whether the model's family has a vision tower (its engines hold a vision engine too)."""
        return family_for(self._source(model)[1]).vision is not None

    def _require_vision_language(self, model: str) -> None:
        if not self.vision_language(model):
            family = family_for(self._source(model)[1]).family
            raise SourceError(
                f"model '{model}' is a text-only {family} model with no vision encoder, so onnx/{model}/visual/ "
                f"cannot be built; request its LLM targets (onnx/{model}_<precision>/llm/model.onnx) instead"
            )

    def visual_inputs(self, model: str) -> dict[str, Any]:
        """Inputs of export_visual: the source stamps of a vision-language model (any LLM precision shares it)."""
        self._require_vision_language(model)
        return {"source": self.source_inputs(model)}

    def visual_options(self, model: str) -> str:
        """The export_visual flags that decide its output (recorded: a new visual_precision reruns it)."""
        return f"--quantization {self.settings(model).visual_precision}"

    def visual_engine_sm(self, model: str, sm: str | int) -> int:
        """The SM of a vision engine, checked against the model's visual_precision."""
        self._require_vision_language(model)
        target = int(sm)
        visual = self.settings(model).visual_precision
        check_sm_supports(parse_precision("fp16"), target)  # a known target at all
        floor = SM_FLOOR.get(visual, 0)
        if target < floor:
            raise PrecisionError(
                f"model '{model}': visual_precision {visual} needs SM >= {floor}, but this engine is for sm{target}; "
                f"set visual_precision: fp16 or target sm{floor} or newer"
            )
        return target

    def draft_checkpoint(self, model: str) -> Path:
        """The model's EAGLE3 draft checkpoint, checked to fit the base (hidden size, vocabulary)."""
        if model not in self._drafts:
            draft = self.settings(model).draft
            if draft is None:
                raise ConfigError(
                    f"model '{model}' has no draft; add draft: {{source: <EAGLE3 draft directory or hub id>}} under "
                    f"models.{model} to build its EAGLE targets"
                )
            path = resolve_source(draft.source, model=model)
            where = f"model '{model}' draft ({draft.source})"
            try:
                check_draft_fits(read_hf_config(path, model=model), self._source(model)[1], where)
                draft_weight_files(path)
            except SourceError as err:
                raise SourceError(str(err) if str(err).startswith(where) else f"{where}: {err}") from err
            self._drafts[model] = path
        return self._drafts[model]

    def draft_source_inputs(self, model: str) -> list[str]:
        """The stamps standing for the model's draft checkpoint."""
        return self._stamps_of(f"{model}/draft", self.draft_checkpoint(model), self.state_dir / "drafts" / model)

    def eagle_base_inputs(self, model: str, precision: str) -> dict[str, Any]:
        """Inputs of export_eagle_base: those of export_llm, for a model with a draft."""
        self.draft_checkpoint(model)
        return self.export_inputs(model, precision)

    def draft_precision(self, model: str) -> Precision:
        """The draft's own precision, checked against the draft (block dims, a precision it holds) and the base."""
        if model not in self._draft_precisions:
            path = self.draft_checkpoint(model)
            text = self.settings(model).draft.precision
            where = f"model '{model}' draft"
            parsed = parse_precision(text)
            draft_config = read_hf_config(path, model=model)
            held = held_precision(path, draft_config)
            if held is not None and held.precision != parsed:
                raise PrecisionError(
                    f"{where}: the draft is already quantized as {held.precision} ({held.origin}); "
                    f"set its precision: {held.precision}"
                )
            weights = FORMATS[parsed.weights]
            if held is None and not weights.made_here:
                raise PrecisionError(
                    f"{where}: {weights.name} means a {weights.quant_method_label}-quantized draft; "
                    f"use {weights.quantize_instead} to quantize it"
                )
            if held is None and parsed.needs_quantize_step and self._source(model)[2] is not None:
                raise PrecisionError(
                    f"{where}: quantize-draft calibrates through the unquantized base, but the source is already "
                    f"quantized ({self._source(model)[2].precision}); use draft precision fp16 or an unquantized source"
                )
            check_draft_block_dims(draft_config, parsed, where=where)
            self._draft_precisions[model] = (parsed, held is None and parsed.needs_quantize_step)
        return self._draft_precisions[model][0]

    def quantized_draft_manifest(self, model: str) -> str | None:
        """The quantize-draft manifest when the draft's precision needs that step, else None."""
        parsed = self.draft_precision(model)
        return f"quantized/{model}/draft_{parsed}/manifest.json" if self._draft_precisions[model][1] else None

    def quantize_draft_inputs(self, model: str, draft_precision: str) -> dict[str, Any]:
        """Inputs of quantize_draft: the draft's and the base's stamps, a local calibration corpus."""
        if self.quantized_draft_manifest(model) != f"quantized/{model}/draft_{draft_precision}/manifest.json":
            raise PrecisionError(
                f"model '{model}': its draft's precision is {self.draft_precision(model)}, so "
                f"quantized/{model}/draft_{draft_precision}/ is not one of its targets; set draft.precision"
            )
        return {
            "draft": self.draft_source_inputs(model),
            "source": self.source_inputs(model),
            **self._calibration_inputs(model),
        }

    def quantize_draft_options(self, model: str) -> str:
        """The quantize-draft flags that decide its output (recorded)."""
        return self._quantize_flags(model, self.draft_precision(model))

    def quantize_draft_mem_mb(self, model: str) -> int:
        """Host RAM of a quantize-draft job: the float base runs beside the draft being calibrated."""
        parsed = self.draft_precision(model)
        quant = self.settings(model).quantization
        batch = min(quant.batch_size or calibration_batch_size(parsed), quant.calib_size)
        draft_bytes = sum(p.stat().st_size for p in draft_weight_files(self.draft_checkpoint(model)))
        return resources.quantize_mem_mb(
            self.weight_bytes(model) + draft_bytes,
            parsed.weights,
            batch=batch,
            tokens=quant.calib_max_tokens,
            vocab_size=decoder_dims(self._source(model)[1]).vocab_size,
        )

    def draft_export_checkpoint(self, model: str) -> Path:
        """What export-draft reads: the quantized draft, or the draft checkpoint itself."""
        manifest = self.quantized_draft_manifest(model)
        return Path(manifest).parent if manifest else self.draft_checkpoint(model)

    def export_draft_inputs(self, model: str, precision: str) -> dict[str, Any]:
        """Inputs of export_draft: the quantized draft or the draft's stamps, and the base source's stamps."""
        self.precision(model, precision)
        manifest = self.quantized_draft_manifest(model)
        draft = {"quantized_draft": manifest} if manifest else {"draft": self.draft_source_inputs(model)}
        return {**draft, "source": self.source_inputs(model)}

    def draft_engine_sm(self, model: str, precision: str, sm: str | int) -> int:
        """The SM of a draft engine, checked against the base's precision and the draft's own."""
        target = self.engine_sm(model, precision, sm)
        try:
            check_sm_supports(self.draft_precision(model), target)
        except PrecisionError as err:
            raise PrecisionError(f"model '{model}' draft: {err}") from None
        return target

    def adapter_checkpoint(self, model: str, adapter: str) -> Path:
        """A LoRA adapter of the model, checked against it (its modules and widths, its rank) from headers only."""
        key = (model, adapter)
        if key not in self._adapters:
            settings = self.settings(model)
            entry = settings.lora.get(adapter)
            if entry is None:
                raise ConfigError(
                    f"model '{model}' has no LoRA adapter '{adapter}'; add lora: {{{adapter}: <PEFT adapter directory "
                    f"or hub id>}} under models.{model}"
                )
            where = f"model '{model}' adapter '{adapter}' ({entry.source})"
            if settings.draft is not None and not entry.merge:
                raise ConfigError(f"model '{model}' has a draft and LoRA adapters; EAGLE engines take no LoRA")
            path = resolve_source(entry.source, model=model)
            try:
                _, modules = read_fitting_adapter(path, self._source(model)[1], f"model '{model}'", tensors=False)
            except SourceError as err:
                raise SourceError(f"{where}: {err}") from err
            rank, limit = max(m.rank for m in modules), settings.build.max_lora_rank
            if rank > limit and not entry.merge:
                raise ConfigError(
                    f"{where}: its rank is {rank} but build.max_lora_rank is {limit}; set build.max_lora_rank: {rank} "
                    f"(or more) for model '{model}'"
                )
            self._adapters[key] = path
        return self._adapters[key]

    def lora_adapters(self, model: str) -> list[str]:
        """The names of the adapters the model's engines serve (not the merged ones), each checked."""
        names = sorted(name for name, entry in self.settings(model).lora.items() if not entry.merge)
        for name in names:
            self.adapter_checkpoint(model, name)
        return names

    def merged_variants(self, model: str) -> list[str]:
        """``<model>+<adapter>`` for each of the model's ``merge: true`` adapters."""
        merged = sorted(name for name, entry in self.settings(model).lora.items() if entry.merge)
        return [f"{model}{VARIANT_SEPARATOR}{name}" for name in merged]

    def merge_lora_inputs(self, model: str, adapter: str) -> dict[str, Any]:
        """Inputs of merge_lora: the adapter's stamps and the model's."""
        variant = f"{model}{VARIANT_SEPARATOR}{adapter}"
        self._source(variant)  # a merge: true adapter of a float source
        return self.process_lora_inputs(model, adapter)

    def process_lora_inputs(self, model: str, adapter: str) -> dict[str, Any]:
        """Inputs of process_lora: the adapter's stamps, and the model's (its config decides the check)."""
        path = self.adapter_checkpoint(model, adapter)
        stamps = self._stamps_of(f"{model}/lora/{adapter}", path, self.state_dir / "adapters" / model / adapter)
        return {"adapter": stamps, "source": self.source_inputs(model)}

    def verify_lora_inputs(self, model: str, precision: str, adapter: str) -> dict[str, Any]:
        """Inputs of verify_lora: those of verify_onnx, the LoRA graph and one served adapter's stamps."""
        if adapter not in self.lora_adapters(model):
            self.adapter_checkpoint(model, adapter)  # an unknown adapter: the error names the fix
            raise ConfigError(f"model '{model}' adapter '{adapter}' is merged (merge: true); verify {model}+{adapter}")
        return {
            **self.verify_inputs(model, precision),
            "lora_graph": self._lora_graph(model, precision),
            "adapter": self.process_lora_inputs(model, adapter)["adapter"],
        }

    @staticmethod
    def _lora_graph(model: str, precision: str) -> str:
        """The insert-lora target of a model's LLM export."""
        return f"onnx/{model}_{precision}/llm/lora_model.onnx"

    def lora_graph_inputs(self, model: str, precision: str) -> dict[str, str]:
        """Inputs of insert_lora: the LLM export of a model with adapters."""
        self.precision(model, precision)
        if not self.lora_adapters(model):
            raise ConfigError(
                f"model '{model}' has no LoRA adapters, so {self._lora_graph(model, precision)} is not a "
                f"target; add lora: {{<name>: <PEFT adapter>}} under models.{model}"
            )
        return {"manifest": f"onnx/{model}_{precision}/llm/manifest.json"}

    def engine_inputs(self, model: str, precision: str, sm: str | int | None) -> dict[str, str]:
        """Inputs of build_engine: the LLM export (the EAGLE base's, with its draft engine, for a model with
        a draft), and for a VLM the vision engine of the same SM."""
        target = self.engine_sm(model, precision, sm)
        inputs = {"manifest": f"onnx/{model}_{precision}/llm/manifest.json"}
        if self.settings(model).draft is not None:
            self.draft_engine_sm(model, precision, target)
            inputs["manifest"] = f"onnx/{model}_{precision}/eagle_base/manifest.json"
            inputs["draft"] = f"engines/sm{target}/draft/{model}_{precision}.engine"
        if self.vision_language(model):
            self.visual_engine_sm(model, target)
            inputs["visual"] = f"engines/sm{target}/visual/{model}.engine"
        if adapters := self.lora_adapters(model):
            inputs["lora_graph"] = self._lora_graph(model, precision)
            inputs.update({f"adapter_{adapter}": f"lora/{model}/{adapter}/manifest.json" for adapter in adapters})
        return inputs

    def verify_inputs(self, model: str, precision: str) -> dict[str, Any]:
        """Inputs of verify_onnx: the export's manifest and the source it must match."""
        inputs = self.export_inputs(model, precision)
        inputs.pop("chat_template", None)
        return {"manifest": f"onnx/{model}_{precision}/llm/manifest.json", **inputs}

    def engine_sm(self, model: str, precision: str, sm: str | int | None) -> int:
        """The SM target of an engine target (the model's default when ``sm`` is None), checked."""
        settings = self.settings(model)
        target = settings.default_sm if sm is None else int(sm)
        check_sm_supports(self.precision(model, precision), target)
        return target

    def build_limits(self, model: str, kind: str = "llm") -> dict[str, int]:
        """The limits an engine of ``kind`` reads: changing another one leaves it up to date."""
        limits = vars(self.settings(model).build)
        return {key: limits[key] for key in LIMITS_READ[kind]}

    def _section(self, name: str) -> dict[str, Any]:
        return self.config.get(name) or {}

    def engine_plugin_path(self) -> str | None:
        return self._section("engine").get("plugin_path")

    def engine_mem_mb(self, model: str) -> int:
        """Host RAM of an engine job: a multiple of the source checkpoint's weight bytes, at least 4 GB."""
        factor = float(self._section("engine").get("host_memory_factor", 4))
        return max(4096, math.ceil(factor * self.weight_bytes(model) / 2**20))

    def weight_bytes(self, model: str) -> int:
        """Bytes of the source checkpoint's weight files (a merged variant's: its model's, merged or not yet)."""
        return sum(p.stat().st_size for p in weight_files(self.checkpoint(split_variant(model)[0])))

    def quantize_mem_mb(self, model: str, precision: str) -> int:
        """Host RAM of a quantize job: measured peaks per weight format and calibration batch (resources.py)."""
        parsed = self.precision(model, precision)
        quant = self.settings(model).quantization
        batch = min(quant.batch_size or calibration_batch_size(parsed), quant.calib_size)
        return resources.quantize_mem_mb(
            self.weight_bytes(model),
            parsed.weights,
            batch=batch,
            tokens=quant.calib_max_tokens,
            vocab_size=decoder_dims(self._source(model)[1]).vocab_size,
        )

    def quantize_threads(self, model: str) -> int:
        return self.settings(model).quantization.threads

    def quantize_gpus(self, model: str) -> int:
        """1 when calibration runs on a GPU (any GPU: the quantized checkpoint is not SM-specific)."""
        return int(self.settings(model).quantization.device == "cuda")

    def verify_mem_mb(self, model: str, precision: str) -> int:
        """Host RAM of a verify job: a measured multiple of the source's bytes (resources.py)."""
        self.precision(model, precision)
        held = self._source(model)[2]
        return resources.verify_mem_mb(self.weight_bytes(model), held.precision.weights if held else FLOAT_WEIGHTS)

    def merge_lora_mem_mb(self, model: str) -> int:
        """Host RAM of a merge-lora job: the model in float32 with the adapter, as a verify job holds it."""
        return resources.verify_mem_mb(self.weight_bytes(model))

    def verify_visual_inputs(self, model: str) -> dict[str, Any]:
        """Inputs of verify_visual: the vision export's manifest and the source it must match."""
        return {"manifest": f"onnx/{model}/visual/manifest.json", **self.visual_inputs(model)}

    def verify_visual_mem_mb(self, model: str) -> int:
        """Host RAM of a vision verify job: bounded by the verify of the whole model (the tower is a part)."""
        return resources.verify_mem_mb(self.weight_bytes(model))

    def verify_threads(self, model: str) -> int:
        return self.settings(model).verify.threads

    def engine_constraint(self, sm: int | str) -> str:
        return str(self._section("cluster").get("constraints", {}).get(str(sm), f"sm{sm}"))

    def engine_partition(self, sm: int | str) -> str:
        """The mapped partition, or "" (the executor's default partition)."""
        return str(self._section("cluster").get("partitions", {}).get(str(sm), ""))

    def _models(self) -> list[str]:
        """Every configured model, then its merged variants."""
        return [name for model in self.config["models"] for name in (model, *self.merged_variants(model))]

    def all_engines(self) -> list[str]:
        targets = []
        for model in self._models():
            settings = self.settings(model)
            for precision in settings.precisions:
                targets += [f"engines/sm{sm}/{model}_{precision}.engine" for sm in settings.sm_targets]
        return targets

    def all_exports(self) -> list[str]:
        targets = []
        for model in self._models():
            targets += [f"onnx/{model}_{precision}/llm/model.onnx" for precision in self.settings(model).precisions]
            if self.vision_language(model):
                targets.append(f"onnx/{model}/visual/model.onnx")
            if self.settings(model).draft is not None:
                for precision in self.settings(model).precisions:
                    targets += [f"onnx/{model}_{precision}/{kind}/model.onnx" for kind in ("eagle_base", "draft")]
            if adapters := self.lora_adapters(model):
                targets += [self._lora_graph(model, p) for p in self.settings(model).precisions]
                targets += [f"lora/{model}/{a}/processed_adapter_model.safetensors" for a in adapters]
        return targets
