"""What each rule reads and the flags it passes: its inputs, and its command-line options, per target.

Inputs are file paths Snakemake tracks (stamps standing for checkpoints, manifests of earlier
steps). Options come in two kinds, as the rules record them: flags that decide what is built
(recorded, so a change reruns the job) and paths of things whose content is tracked through
their stamps (not recorded, so moving a checkpoint reruns nothing). Every path that reaches a
shell command is quoted here.
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path
from typing import Any

from edgellm_steps.errors import ConfigError, PrecisionError
from edgellm_steps.export.kinds import DRAFT, EAGLE_BASE, LLM, MANIFEST, VISUAL
from edgellm_steps.quant.precision import Precision
from edgellm_steps.workflow import targets
from edgellm_steps.workflow.accuracy_inputs import AccuracyInputs
from edgellm_steps.workflow.model_facts import Facts
from edgellm_steps.workflow.signature_inputs import SignatureInputs


def _flags(limits: dict[str, int]) -> str:
    return " ".join(f"--{key} {value}" for key, value in sorted(limits.items()))


class RuleInputs(SignatureInputs, AccuracyInputs):
    """Inputs and options of every rule, answered from the checked facts."""

    def __init__(self, facts: Facts) -> None:
        self.facts = facts

    # dequantize (a block-FP8 source)

    def dequantize_fp8(self, model: str) -> dict[str, Any]:
        """Inputs of dequantize_fp8: the stamps of a block-FP8 source as it is."""
        checked = self.facts.model(model)
        if checked.checkpoint.block_fp8 is None:
            raise ConfigError(
                f"model '{model}' is not a block-FP8 release (quantization_config.quant_method fp8), so "
                f"{targets.path(targets.DEQUANTIZED_MANIFEST, model=model)} is not a target; its steps read its "
                "source as it is"
            )
        return {"source": checked.release_stamps}

    def release_checkpoint(self, model: str) -> str:
        """The configured source as it is (not recorded: its content is, through its stamps)."""
        return str(self.facts.model(model).source.path)

    # quantize

    def quantized_manifest(self, model: str, precision: str) -> str | None:
        """The quantize step's manifest when ``precision`` needs that step, else None."""
        needed = self.facts.model(model).needs_quantize(precision)
        return targets.path(targets.QUANTIZED, model=model, precision=precision) if needed else None

    def _quantized_precision(self, model: str, precision: str) -> Precision:
        if self.quantized_manifest(model, precision) is None:
            raise PrecisionError(f"precision '{precision}' has no quantize step: export the checkpoint directly")
        return self.facts.model(model).precision(precision)

    def quantize_llm(self, model: str, precision: str) -> dict[str, Any]:
        """Inputs of quantize_llm: the source stamps, and the model's shared statistics (every precision they
        serve) or a local calibration corpus (AWQ's, which calibrates on the text itself)."""
        stamps = {"source": self.facts.model(model).source_stamps}
        if self._quantized_precision(model, precision).from_statistics:
            return {**stamps, "statistics": targets.path(targets.CALIBRATION_MANIFEST, model=model)}
        return {**stamps, **self._calibration(model)}

    def quantize_options(self, model: str, precision: str) -> str:
        """The quantize CLI flags that decide its output (recorded, so a change reruns the job): the precision,
        and the calibration flags unless the shared statistics (an input, whose own job records them) serve it."""
        checked = self.facts.model(model)
        parsed = checked.precision(precision)
        checked.excluded_linears  # noqa: B018 (each pattern matches a decoder Linear)
        exclude = "".join(f" --exclude {shlex.quote(p)}" for p in checked.settings.quantization.exclude)
        if parsed.from_statistics:
            statistics = shlex.quote(targets.path(targets.CALIBRATION, model=model))
            return f"--precision {parsed} --statistics_dir {statistics}{exclude}"
        return f"--precision {parsed} {self._calibration_flags(model)}{exclude}"

    def calibrate_llm(self, model: str) -> dict[str, Any]:
        """Inputs of calibrate_llm: the source stamps and a local calibration corpus."""
        checked = self.facts.model(model)
        held = checked.checkpoint.held
        if held is not None:
            raise ConfigError(
                f"model '{model}' is already quantized as {held.precision}, so "
                f"{targets.path(targets.CALIBRATION_MANIFEST, model=model)} is not a target: nothing is calibrated"
            )
        return {"source": checked.source_stamps, **self._calibration(model)}

    def calibrate_options(self, model: str) -> str:
        """The calibrate-llm flags that decide its output (recorded)."""
        return self._calibration_flags(model)

    def _calibration_flags(self, model: str) -> str:
        """The calibration flags of calibrate-llm, quantize-llm (AWQ) and quantize-draft."""
        quant = self.facts.model(model).settings.quantization
        flags = [f"--calib_size {quant.calib_size} --calib_max_tokens {quant.calib_max_tokens}"]
        if quant.batch_size:
            flags.append(f"--calib_batch_size {quant.batch_size}")
        if quant.dataset:
            flags.append(f"--dataset_dir {shlex.quote(quant.dataset)}")
        return " ".join(flags)

    def _calibration(self, model: str) -> dict[str, Any]:
        files = self.facts.model(model).corpus_files("quantization.dataset")
        return {"calibration": files} if files else {}

    def quantize_device(self, model: str) -> str:
        """Where calibration runs (not recorded: it does not change what is built)."""
        return self.facts.model(model).settings.quantization.device

    def quantize_draft(self, model: str, draft_precision: str) -> dict[str, Any]:
        """Inputs of quantize_draft: the draft's and the base's stamps, a local calibration corpus."""
        checked = self.facts.model(model)
        if self.quantized_draft_manifest(model) != targets.path(
            targets.QUANTIZED_DRAFT, model=model, draft_precision=draft_precision
        ):
            raise PrecisionError(
                f"model '{model}': its draft's precision is {checked.draft_precision}, so "
                f"quantized/{model}/draft_{draft_precision}/ is not one of its targets; set draft.precision"
            )
        return {"draft": checked.draft_stamps, "source": checked.source_stamps, **self._calibration(model)}

    def quantize_draft_options(self, model: str) -> str:
        """The quantize-draft flags that decide its output (recorded)."""
        return f"--precision {self.facts.model(model).draft_precision} {self._calibration_flags(model)}"

    def quantized_draft_manifest(self, model: str) -> str | None:
        """The quantize-draft manifest when the draft's precision needs that step, else None."""
        checked = self.facts.model(model)
        if not checked.draft_needs_quantize:
            return None
        return targets.path(targets.QUANTIZED_DRAFT, model=model, draft_precision=checked.draft_precision)

    # checkpoints (not recorded: their content is, through stamps or manifests)

    def checkpoint(self, model: str) -> str:
        return str(self.facts.model(model).checkpoint.path)

    def draft_checkpoint(self, model: str) -> str:
        return str(self.facts.model(model).draft_checkpoint)

    def adapter_checkpoint(self, model: str, adapter: str) -> str:
        return str(self.facts.model(model).adapter_checkpoint(adapter))

    def adapter_option(self, model: str, adapter: str) -> str:
        """verify-onnx's adapter flag for one served adapter."""
        return f"--adapter {shlex.quote(self.adapter_checkpoint(model, adapter))}"

    def export_checkpoint(self, model: str, precision: str) -> str:
        """What export-llm and verify-onnx read: the quantized checkpoint, or the source itself."""
        manifest = self.quantized_manifest(model, precision)
        return str(Path(manifest).parent) if manifest else self.checkpoint(model)

    def draft_export_checkpoint(self, model: str) -> str:
        """What export-draft reads: the quantized draft, or the draft checkpoint itself."""
        manifest = self.quantized_draft_manifest(model)
        return str(Path(manifest).parent) if manifest else self.draft_checkpoint(model)

    # exports

    def export_llm(self, model: str, precision: str) -> dict[str, Any]:
        """Inputs of export_llm: the quantized checkpoint's manifest or the source stamps, and a chat template."""
        quantized = self.quantized_manifest(model, precision)
        checked = self.facts.model(model)
        checked.excluded_linears  # noqa: B018 (exclusions on a pre-quantized source are refused, not ignored)
        inputs: dict[str, Any] = {"quantized": quantized} if quantized else {"source": checked.source_stamps}
        if template := checked.chat_template:
            inputs["chat_template"] = template
        if checked.settings.reduced_vocab is not None:
            inputs["vocab_map"] = targets.path(targets.VOCAB_MANIFEST, model=model)
        return inputs

    def export_options(self, model: str, precision: str) -> str:
        """export-llm's chat template and reduced vocabulary, tracked as inputs (so not recorded)."""
        settings = self.facts.model(model).settings
        options = []
        if settings.chat_template:
            options.append(f"--chat_template {shlex.quote(settings.chat_template)}")
        if settings.reduced_vocab is not None:
            vocab_dir = os.path.dirname(targets.path(targets.VOCAB_MANIFEST, model=model))
            options.append(f"--reduced_vocab_dir {shlex.quote(vocab_dir)}")
        return " ".join(options)

    def eagle_base(self, model: str, precision: str) -> dict[str, Any]:
        """Inputs of export_eagle_base: those of export_llm, for a model with a draft."""
        self.facts.model(model).draft_checkpoint  # noqa: B018 (a model without a draft is refused)
        return self.export_llm(model, precision)

    def export_draft(self, model: str, precision: str) -> dict[str, Any]:
        """Inputs of export_draft: the quantized draft or the draft's stamps, and the base's config stamp."""
        checked = self.facts.model(model)
        checked.precision(precision)
        manifest = self.quantized_draft_manifest(model)
        draft = {"quantized_draft": manifest} if manifest else {"draft": checked.draft_stamps}
        return {**draft, "source": checked.config_stamps}

    def export_visual(self, model: str) -> dict[str, Any]:
        """Inputs of export_visual: the source stamps of a vision-language model (any LLM precision shares it)."""
        checked = self.facts.model(model)
        checked.require_vision_language()
        return {"source": checked.source_stamps}

    def visual_options(self, model: str) -> str:
        """The export_visual flags that decide its output (recorded: a new visual_precision reruns it)."""
        return f"--quantization {self.facts.model(model).settings.visual_precision}"

    def reduce_vocab(self, model: str) -> dict[str, Any]:
        """Inputs of reduce_vocab: the source (its tokenizer), the draft (its d2t), a local corpus."""
        checked = self.facts.model(model)
        reduced = checked.settings.reduced_vocab
        if reduced is None:
            raise ConfigError(
                f"model '{model}' has no reduced_vocab; add reduced_vocab: {{size: <ids to keep>}} under models.{model}"
            )
        inputs: dict[str, Any] = {"source": checked.source_stamps}
        if checked.settings.draft is not None:
            inputs["draft"] = checked.draft_stamps
        if files := checked.corpus_files("reduced_vocab.corpus"):
            inputs["corpus"] = files
        return inputs

    def reduce_vocab_options(self, model: str) -> str:
        """The reduce-vocab flags that decide its output (recorded: a new size or corpus reruns it)."""
        reduced = self.facts.model(model).settings.reduced_vocab
        flags = f"--reduced_vocab_size {reduced.size}"
        return flags + (f" --corpus {shlex.quote(reduced.corpus)}" if reduced.corpus else "")

    def reduce_vocab_draft(self, model: str) -> str:
        """The draft whose d2t the reduced vocabulary keeps (not recorded: its content is, through its stamps)."""
        if self.facts.model(model).settings.draft is None:
            return ""
        return f"--draft_model_dir {shlex.quote(self.draft_checkpoint(model))}"

    # LoRA

    def insert_lora(self, model: str, precision: str) -> dict[str, str]:
        """Inputs of insert_lora: the LLM export of a model with adapters."""
        checked = self.facts.model(model)
        checked.precision(precision)
        if not checked.lora_adapters:
            graph = targets.path(targets.LORA_GRAPH, model=model, precision=precision)
            raise ConfigError(
                f"model '{model}' has no LoRA adapters, so {graph} is not a target; "
                f"add lora: {{<name>: <PEFT adapter>}} under models.{model}"
            )
        return {"manifest": targets.export_path(LLM, MANIFEST, model, precision)}

    def process_lora(self, model: str, adapter: str) -> dict[str, Any]:
        """Inputs of process_lora: the adapter's stamps, and the model's config's (it decides the check)."""
        checked = self.facts.model(model)
        return {"adapter": checked.adapter_stamps(adapter), "source": checked.config_stamps}

    def merge_lora(self, model: str, adapter: str) -> dict[str, Any]:
        """Inputs of merge_lora: the adapter's stamps and the model's."""
        self.facts.model(targets.variant(model, adapter)).checkpoint  # noqa: B018 (a merge: true adapter, float source)
        return self.process_lora(model, adapter)

    # verify

    def verify_onnx(self, model: str, precision: str) -> dict[str, Any]:
        """Inputs of verify_onnx: the export's manifest and the source it must match."""
        inputs = self.export_llm(model, precision)
        inputs.pop("chat_template", None)
        return {"manifest": targets.export_path(LLM, MANIFEST, model, precision), **inputs}

    def verify_visual(self, model: str) -> dict[str, Any]:
        """Inputs of verify_visual: the vision export's manifest and the source it must match."""
        return {"manifest": targets.export_path(VISUAL, MANIFEST, model), **self.export_visual(model)}

    def verify_lora(self, model: str, precision: str, adapter: str) -> dict[str, Any]:
        """Inputs of verify_lora: those of verify_onnx, the LoRA graph and one served adapter's stamps."""
        checked = self.facts.model(model)
        if adapter not in checked.lora_adapters:
            checked.adapter_checkpoint(adapter)  # an unknown adapter: the error names the fix
            raise ConfigError(f"model '{model}' adapter '{adapter}' is merged (merge: true); verify {model}+{adapter}")
        return {
            **self.verify_onnx(model, precision),
            "lora_graph": targets.path(targets.LORA_GRAPH, model=model, precision=precision),
            "adapter": checked.adapter_stamps(adapter),
        }

    # engines

    def engine(self, model: str, precision: str, sm: str) -> dict[str, str]:
        """Inputs of build_engine: the LLM export (the EAGLE base's, with its draft engine, for a model with
        a draft), and for a VLM the vision engine of the same SM."""
        checked = self.facts.model(model)
        target = checked.engine_sm(precision, sm)
        inputs = {"manifest": targets.export_path(LLM, MANIFEST, model, precision)}
        if checked.settings.draft is not None:
            checked.draft_engine_sm(precision, target)
            inputs["manifest"] = targets.export_path(EAGLE_BASE, MANIFEST, model, precision)
            inputs["draft"] = targets.path(targets.DRAFT_ENGINE, sm=target, model=model, precision=precision)
        if checked.vision_language:
            checked.visual_engine_sm(target)
            inputs["visual"] = targets.path(targets.VISUAL_ENGINE, sm=target, model=model)
        if adapters := checked.lora_adapters:
            inputs["lora_graph"] = targets.path(targets.LORA_GRAPH, model=model, precision=precision)
            for adapter in adapters:
                inputs[f"adapter_{adapter}"] = targets.path(targets.LORA_MANIFEST, model=model, adapter=adapter)
        return inputs

    def draft_engine(self, model: str, precision: str) -> dict[str, str]:
        return {"manifest": targets.export_path(DRAFT, MANIFEST, model, precision)}

    def visual_engine(self, model: str) -> dict[str, str]:
        return {"manifest": targets.export_path(VISUAL, MANIFEST, model)}

    def engine_parts(self, model: str, precision: str, sm: str) -> str:
        """The vision engine, draft engine and adapters placed into an engine directory (not recorded: they
        are inputs, whose changes already rerun the job; processed adapters are linked, not built in)."""
        inputs = self.engine(model, precision, sm)
        options = [f"--visual_engine_dir {shlex.quote(inputs['visual'])}"] if "visual" in inputs else []
        if "draft" in inputs:
            options.append(f"--draft_engine_dir {shlex.quote(inputs['draft'])}")
        for adapter in self.facts.model(model).lora_adapters:
            directory = os.path.dirname(targets.path(targets.LORA_MANIFEST, model=model, adapter=adapter))
            options.append(f"--lora_adapter {shlex.quote(f'{adapter}={directory}')}")
        return " ".join(options)

    def engine_sm(self, model: str, precision: str, sm: str | None) -> int:
        return self.facts.model(model).engine_sm(precision, sm)

    def draft_engine_sm(self, model: str, precision: str, sm: str) -> int:
        return self.facts.model(model).draft_engine_sm(precision, sm)

    def visual_engine_sm(self, model: str, sm: str) -> int:
        return self.facts.model(model).visual_engine_sm(sm)

    def engine_limits(self, model: str) -> str:
        """The build limits an LLM engine reads, as flags (recorded: changing another reruns nothing)."""
        return _flags(self.facts.model(model).build_limits("llm"))

    def visual_engine_limits(self, model: str) -> str:
        return _flags(self.facts.model(model).build_limits("visual"))

    def engine_plugin(self) -> str:
        """Where the plugin library lives on a build host (not recorded: not part of the engine)."""
        path = self.facts.section("engine").get("plugin_path")
        return f"--plugin_path {shlex.quote(path)}" if path else ""

    def default_engine(self, model: str, precision: str) -> str:
        """The engine of the model's default SM target, which ``engines/<model>_<precision>.engine`` links to."""
        sm = self.facts.model(model).engine_sm(precision, None)
        return targets.path(targets.ENGINE, sm=sm, model=model, precision=precision)
