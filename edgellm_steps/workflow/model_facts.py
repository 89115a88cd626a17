"""The checked facts of each model a plan asks about: one record per model, each fact worked out once.

Snakemake asks about the same model for every job of a DAG build; a :class:`CheckedModel`
opens its checkpoint, its draft and its adapters the first time a rule needs them (a broken
draft does not stop a plan that never reaches an EAGLE target) and keeps the answer. Every
check raises :class:`~edgellm_steps.errors.EdgeLLMError` in one line naming the fix.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from functools import cached_property
from pathlib import Path
from typing import Any

from edgellm_steps.artifacts.digests import DigestCache
from edgellm_steps.artifacts.draft_weights import draft_d2t_header
from edgellm_steps.artifacts.signatures import SignatureSpec, check_signature_files
from edgellm_steps.artifacts.sources import STAMP_SUFFIX, STATE_DIR, read_hf_config, refresh_stamps, resolve_source
from edgellm_steps.engine.limits import LIMITS_READ, image_token_limits
from edgellm_steps.errors import ChatTemplateError, ConfigError, EdgeLLMError, PrecisionError, SourceError
from edgellm_steps.export.chat_template import load_processed_chat_template
from edgellm_steps.lora.adapter_fit import read_fitting_adapter
from edgellm_steps.models.eagle import check_d2t, check_draft_fits, check_eagle_base
from edgellm_steps.models.vision_geometry import runtime_warnings
from edgellm_steps.quant.calibration import check_corpus_source
from edgellm_steps.quant.checkpoint_record import OpenedCheckpoint, check_source_fits, open_checkpoint
from edgellm_steps.quant.exclusions import source_exclusions
from edgellm_steps.quant.formats import FLOAT_WEIGHTS, FORMATS
from edgellm_steps.quant.precision import SM_FLOOR, Precision, check_sm_supports, parse_precision
from edgellm_steps.quant.prequantized import held_precision
from edgellm_steps.quant.shape_checks import check_draft_block_dims
from edgellm_steps.workflow import targets
from edgellm_steps.workflow.config import ModelSettings, load_schema, model_settings

log = logging.getLogger(__name__)


class CheckedModel:
    """One model (or merged variant ``<model>+<adapter>``) of the config, checked as far as a plan needs."""

    def __init__(self, name: str, facts: Facts) -> None:
        self.name = name
        self.facts = facts
        self.base, self.merged_adapter = targets.split_variant(name)
        self._adapters: dict[str, Path] = {}
        self._corpora: set[str] = set()

    @cached_property
    def settings(self) -> ModelSettings:
        """The model's settings; a merged variant's are its model's, with the merged checkpoint as source."""
        settings = model_settings(self.facts.config, self.base, self.facts.schema)
        adapter = self.merged_adapter
        if adapter is None:
            return settings
        entry = settings.lora.get(adapter)
        if entry is None or not entry.merge:
            raise ConfigError(
                f"'{self.name}' is no merged variant: model '{self.base}' has no adapter '{adapter}' with merge: true; "
                f"add lora: {{{adapter}: {{source: <PEFT adapter>, merge: true}}}} under models.{self.base}"
            )
        source = targets.path(targets.MERGED, base=self.base, adapter=adapter)
        return replace(settings, name=self.name, source=source, lora={}, signature=None)

    def precision(self, text: str) -> Precision:
        self.settings  # noqa: B018 (an unknown model is named before its precision)
        return parse_precision(text)

    @cached_property
    def checkpoint(self) -> OpenedCheckpoint:
        """The model's local checkpoint, checked: architecture, dims, weight files, tokenizer, held precision.

        A merged variant's is its model's (checked float, and its adapter checked to fit), at the merged path.
        """
        if self.merged_adapter is not None:
            base = self.facts.model(self.base)
            base.adapter_checkpoint(self.merged_adapter)
            held = base.checkpoint.held
            if held is not None:
                raise PrecisionError(
                    f"model '{self.base}' is already quantized as {held.precision}; adapter '{self.merged_adapter}' "
                    "merges into float weights only: use an unquantized source or serve the adapter unmerged"
                )
            return replace(base.checkpoint, path=Path(self.settings.source), block_fp8=None)
        opened = self.source
        if opened.block_fp8 is None:
            return opened
        return replace(opened, path=Path(targets.path(targets.DEQUANTIZED, model=self.name)))

    @cached_property
    def source(self) -> OpenedCheckpoint:
        """The configured source as it is, checked; a block-FP8 release too (its dims are the plan's facts,
        its float checkpoint, dequantized/<model>/, does not exist yet)."""
        where = f"model '{self.name}' ({self.settings.source})"
        opened = open_checkpoint(
            self.settings.source, model=self.name, where=where, allow_download=False, allow_block_fp8=True
        )
        for warning in runtime_warnings(opened.spec, opened.dims, opened.path):
            log.warning("model '%s': %s", self.name, warning)
        return opened

    @cached_property
    def excluded_linears(self) -> list[str]:
        """``quantization.exclude`` resolved against the source's decoder Linears (``quant/exclusions.py``)."""
        patterns, where = self.settings.quantization.exclude, f"model '{self.name}'"
        if not patterns:
            return []
        opened = self.facts.model(self.base).source if self.merged_adapter is not None else self.source
        try:
            return source_exclusions(patterns, opened, self.checkpoint.held, where)
        except PrecisionError as err:
            raise ConfigError(f"{err} under models.{self.name}.quantization") from None

    def needs_quantize(self, text: str) -> bool:
        """Whether ``precision`` is made by the quantize step (checked to fit the source first)."""
        precision = self.precision(text)
        check_source_fits(self.checkpoint, precision, self.name)
        return self.checkpoint.held is None and precision.needs_quantize_step

    def signed(self, content: list[str], signature: SignatureSpec | None, part: str) -> list[str]:
        """``content`` stamps plus, for a part (source, draft, adapter) that declares a signature, its
        verification stamp: every job that reads the part waits for it and reruns when it is redone."""
        if signature is None:
            return content
        check_signature_files(signature, f"model '{self.name}' {part.replace('lora/', 'adapter ')}")
        return [*content, targets.path(targets.SIGNATURE, model=self.name, signed=part)]

    @property
    def source_content_stamps(self) -> list[str]:
        """The content stamps of the configured source as it is (checked first), one per file."""
        return self.facts.stamps(self.source.path, self.facts.state_dir / "sources" / self.name)

    @property
    def source_stamps(self) -> list[str]:
        """The stamps standing for the model's source checkpoint (checked first, and verified against its
        signature when it declares one); the manifest of a merged variant's or a block-FP8 source's checkpoint,
        which a step of the workflow writes."""
        if self.merged_adapter is not None or self.checkpoint.block_fp8 is not None:
            return [f"{self.checkpoint.path}/manifest.json"]
        return self.release_stamps

    @property
    def release_stamps(self) -> list[str]:
        """The configured source as it is (what dequantize-fp8 reads, for a block-FP8 one): its content
        stamps, and its signature's verification when it declares one."""
        return self.signed(self.source_content_stamps, self.settings.signature, targets.SIGNED_SOURCE)

    @property
    def config_stamps(self) -> list[str]:
        """The stamp of the source's ``config.json`` alone: for steps whose output depends on nothing else
        (process-lora checks an adapter against it, export-draft reads the base's dims), so a changed weight
        byte reruns neither. A merged variant's config is written by merge-lora: its manifest stands for it."""
        if self.merged_adapter is not None or self.checkpoint.block_fp8 is not None:
            return self.source_stamps
        config = str(self.facts.state_dir / "sources" / self.name / f"config.json{STAMP_SUFFIX}")
        content = [stamp for stamp in self.source_content_stamps if stamp == config]
        return self.signed(content, self.settings.signature, targets.SIGNED_SOURCE)

    @property
    def vision_language(self) -> bool:
        """Whether the model's family has a vision tower (its engines hold a vision engine too)."""
        return self.checkpoint.spec.vision is not None

    @cached_property
    def chat_template(self) -> str | None:
        """The configured processed chat template, read and validated (export-llm reads it the same way)."""
        template = self.settings.chat_template
        if template is None:
            return None
        if not Path(template).is_file():
            raise ConfigError(
                f"model '{self.name}': chat_template file '{template}' does not exist; fix chat_template in your config"
            )
        try:
            load_processed_chat_template(Path(template))
        except ChatTemplateError as err:
            raise ConfigError(f"model '{self.name}' chat_template: {err}") from None
        return template

    def corpus(self, key: str) -> str | None:
        """``quantization.dataset`` or ``reduced_vocab.corpus``, checked as far as planning can."""
        section, name = key.split(".")
        source = getattr(getattr(self.settings, section), name)
        if key not in self._corpora:
            try:
                check_corpus_source(source)
            except EdgeLLMError as err:
                raise ConfigError(f"model '{self.name}' {key}: {err}; fix {key} in your config") from None
            self._corpora.add(key)
        return source

    def corpus_files(self, key: str) -> list[str]:
        """The files of a local corpus (:meth:`corpus`): inputs whose content decides a step's output."""
        source = self.corpus(key)
        found = Path(source) if source else None
        if found is None or not found.exists():
            return []
        return [str(f) for f in sorted(found.rglob("*")) if f.is_file()] if found.is_dir() else [str(found)]

    def require_vision_language(self) -> None:
        if not self.vision_language:
            raise SourceError(
                f"model '{self.name}' is a text-only {self.checkpoint.spec.family} model with no vision encoder, so "
                f"onnx/{self.name}/visual/ cannot be built; request its LLM targets "
                f"(onnx/{self.name}_<precision>/llm/model.onnx) instead"
            )

    @cached_property
    def draft_checkpoint(self) -> Path:
        """The model's EAGLE3 draft checkpoint, checked to fit the base (hidden size, vocabulary)."""
        draft = self.settings.draft
        if draft is None:
            raise ConfigError(
                f"model '{self.name}' has no draft; add draft: {{source: <EAGLE3 draft directory or hub id>}} under "
                f"models.{self.name} to build its EAGLE targets"
            )
        path = resolve_source(draft.source, model=self.name)
        where = f"model '{self.name}' draft ({draft.source})"
        check_eagle_base(self.checkpoint.dims, f"model '{self.name}'")
        try:
            draft_config = read_hf_config(path, model=self.name)
            _, draft_vocab = check_draft_fits(draft_config, self.checkpoint.hf_config, where)
            if (d2t := draft_d2t_header(path)) is not None:
                check_d2t(d2t[1], d2t[0], draft_vocab, self.checkpoint.dims.vocab_size, where)
        except SourceError as err:
            raise SourceError(str(err) if str(err).startswith(where) else f"{where}: {err}") from err
        return path

    @property
    def draft_content_stamps(self) -> list[str]:
        return self.facts.stamps(self.draft_checkpoint, self.facts.state_dir / "drafts" / self.name)

    @property
    def draft_stamps(self) -> list[str]:
        return self.signed(self.draft_content_stamps, self.settings.draft.signature, targets.SIGNED_DRAFT)

    @cached_property
    def _draft(self) -> tuple[Precision, bool]:
        """The draft's own precision, checked against the draft (block dims, a precision it holds) and the base;
        and whether the quantize-draft step makes it."""
        path = self.draft_checkpoint
        where = f"model '{self.name}' draft"
        parsed = parse_precision(self.settings.draft.precision)
        draft_config = read_hf_config(path, model=self.name)
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
        if held is None and parsed.needs_quantize_step and self.checkpoint.held is not None:
            raise PrecisionError(
                f"{where}: quantize-draft calibrates through the unquantized base, but the source is already "
                f"quantized ({self.checkpoint.held.precision}); use draft precision fp16 or an unquantized source"
            )
        check_draft_block_dims(draft_config, parsed, where=where)
        return parsed, held is None and parsed.needs_quantize_step

    @property
    def draft_precision(self) -> Precision:
        return self._draft[0]

    @property
    def draft_needs_quantize(self) -> bool:
        return self._draft[1]

    def adapter_checkpoint(self, adapter: str) -> Path:
        """A LoRA adapter of the model, checked against it (its modules and widths, its rank) from headers only."""
        if adapter not in self._adapters:
            entry = self.settings.lora.get(adapter)
            if entry is None:
                raise ConfigError(
                    f"model '{self.name}' has no LoRA adapter '{adapter}'; add lora: {{{adapter}: <PEFT adapter "
                    f"directory or hub id>}} under models.{self.name}"
                )
            where = f"model '{self.name}' adapter '{adapter}' ({entry.source})"
            if self.settings.draft is not None and not entry.merge:
                raise ConfigError(f"model '{self.name}' has a draft and LoRA adapters; EAGLE engines take no LoRA")
            path = resolve_source(entry.source, model=self.name)
            try:
                config, owner = self.checkpoint.hf_config, f"model '{self.name}'"
                _, modules = read_fitting_adapter(path, config, owner, tensors=False, merge=entry.merge)
            except SourceError as err:
                raise SourceError(f"{where}: {err}") from err
            rank, limit = max(m.rank for m in modules), self.settings.build.max_lora_rank
            if rank > limit and not entry.merge:
                raise ConfigError(
                    f"{where}: its rank is {rank} but build.max_lora_rank is {limit}; set build.max_lora_rank: "
                    f"{rank} (or more) for model '{self.name}'"
                )
            self._adapters[adapter] = path
        return self._adapters[adapter]

    def adapter_content_stamps(self, adapter: str) -> list[str]:
        path = self.adapter_checkpoint(adapter)
        return self.facts.stamps(path, self.facts.state_dir / "adapters" / self.name / adapter)

    def adapter_stamps(self, adapter: str) -> list[str]:
        signed = targets.path(targets.SIGNED_ADAPTER, adapter=adapter)
        return self.signed(self.adapter_content_stamps(adapter), self.settings.lora[adapter].signature, signed)

    @cached_property
    def lora_adapters(self) -> list[str]:
        """The names of the adapters the model's engines serve (not the merged ones), each checked."""
        names = sorted(name for name, entry in self.settings.lora.items() if not entry.merge)
        for name in names:
            self.adapter_checkpoint(name)
        return names

    @property
    def merged_variants(self) -> list[str]:
        """``<model>+<adapter>`` for each of the model's ``merge: true`` adapters."""
        return [targets.variant(self.name, a) for a, entry in sorted(self.settings.lora.items()) if entry.merge]

    def engine_sm(self, precision: str, sm: str | int | None) -> int:
        """The SM target of an engine target (the model's default when ``sm`` is None), checked."""
        merged = self.facts.model(self.base).settings.lora[self.merged_adapter].source if self.merged_adapter else None
        if (refusal := self.checkpoint.spec.engine_refusal(merged)) is not None:
            raise SourceError(f"model '{self.name}': {refusal}")
        target = self.settings.default_sm if sm is None else int(sm)
        check_sm_supports(self.precision(precision), target)
        return target

    def visual_engine_sm(self, sm: str | int) -> int:
        """The SM of a vision engine, checked against the model's visual_precision."""
        self.require_vision_language()
        target, visual = int(sm), self.settings.visual_precision
        check_sm_supports(Precision(FLOAT_WEIGHTS), target)  # a known target at all
        floor = SM_FLOOR.get(visual, 0)
        if target < floor:
            raise PrecisionError(
                f"model '{self.name}': visual_precision {visual} needs SM >= {floor}, but this engine is for "
                f"sm{target}; set visual_precision: fp16 or target sm{floor} or newer"
            )
        return target

    def draft_engine_sm(self, precision: str, sm: str | int) -> int:
        """The SM of a draft engine, checked against the base's precision and the draft's own."""
        target = self.engine_sm(precision, sm)
        try:
            check_sm_supports(self.draft_precision, target)
        except PrecisionError as err:
            raise PrecisionError(f"model '{self.name}' draft: {err}") from None
        return target

    @property
    def weight_bytes(self) -> int:
        """Bytes of the source checkpoint's weight files (a merged variant's: its model's, merged or not yet;
        a block-FP8 source's: once dequantized)."""
        checkpoint = self.facts.model(self.base).checkpoint
        return checkpoint.weight_bytes if checkpoint.block_fp8 is None else checkpoint.block_fp8.dequantized_bytes

    def build_limits(self, kind: str = "llm") -> dict[str, int]:
        """The limits an engine of ``kind`` reads: changing another one leaves it up to date."""
        build = self.settings.build
        if kind == "visual":  # a tiled tower's defaults, and whole tiles
            self.require_vision_language()
            build = image_token_limits(build, tiled=self.checkpoint.spec.vision.tiled, where=f"model '{self.name}'")
        limits = vars(build)
        return {key: limits[key] for key in LIMITS_READ[kind]}


class Facts:
    """The checked models of one validated config, and the digest cache their stamps share."""

    def __init__(self, config: dict[str, Any], state_dir: Path = STATE_DIR) -> None:
        self.config = config
        self.state_dir = state_dir
        self.schema = load_schema()
        self._models: dict[str, CheckedModel] = {}
        self._stamps: dict[Path, list[str]] = {}
        self._digests: DigestCache | None = None

    def model(self, name: str) -> CheckedModel:
        if name not in self._models:
            self._models[name] = CheckedModel(name, self)
        return self._models[name]

    def stamps(self, checkpoint: Path, stamp_dir: Path) -> list[str]:
        """The stamps of ``checkpoint`` in ``stamp_dir``, brought up to date once per plan."""
        if stamp_dir not in self._stamps:
            if self._digests is None:
                self._digests = DigestCache(self.state_dir / "digest-cache.json")
            self._stamps[stamp_dir] = [str(p) for p in refresh_stamps(checkpoint, stamp_dir, self._digests)]
        return self._stamps[stamp_dir]

    def section(self, name: str) -> dict[str, Any]:
        """A top-level section of the config (``engine``, ``cluster``), empty when absent."""
        return self.config.get(name) or {}

    def names(self) -> list[str]:
        """Every configured model, then its merged variants."""
        return [name for model in self.config["models"] for name in (model, *self.model(model).merged_variants)]
