"""What the accuracy_report job reads and the flags it passes: the exports it compares and the held-out text.

A part of :class:`~edgellm_steps.workflow.rule_inputs.RuleInputs`, kept apart as the rule of one step.
"""

from __future__ import annotations

import os
import shlex
from typing import Any

from edgellm_steps.errors import ConfigError
from edgellm_steps.export.kinds import LLM, MANIFEST
from edgellm_steps.quant.formats import FLOAT_WEIGHTS
from edgellm_steps.workflow import targets
from edgellm_steps.workflow.model_facts import Facts


class AccuracyInputs:
    """Inputs and options of accuracy_report, answered from the checked facts."""

    facts: Facts

    def _accuracy_precisions(self, model: str) -> list[str]:
        """fp16 (the baseline) and every configured precision of the model, each checked."""
        checked = self.facts.model(model)
        where = targets.path(targets.ACCURACY_REPORT, model=model)
        if (held := checked.checkpoint.held) is not None:
            raise ConfigError(
                f"model '{model}' is already quantized as {held.precision}, so {where} is not a target: it compares "
                "each precision with the fp16 export, which a pre-quantized source has not"
            )
        if checked.settings.reduced_vocab is not None:
            raise ConfigError(
                f"model '{model}' has a reduced vocabulary, so {where} is not a target: its logits lack the ids it "
                "drops and its perplexity would not be comparable; add the model again without reduced_vocab"
            )
        precisions = [FLOAT_WEIGHTS, *(p for p in checked.settings.precisions if p != FLOAT_WEIGHTS)]
        for precision in precisions:
            checked.precision(precision)
        return precisions

    def accuracy_report(self, model: str) -> dict[str, Any]:
        """Inputs of accuracy_report: the LLM export of fp16 and of every configured precision, the held-out text."""
        inputs: dict[str, Any] = {
            f"export_{p}": targets.export_path(LLM, MANIFEST, model, p) for p in self._accuracy_precisions(model)
        }
        checked = self.facts.model(model)
        dataset = checked.corpus("accuracy.dataset")
        if dataset and dataset == checked.settings.quantization.dataset:
            raise ConfigError(
                f"model '{model}' accuracy.dataset is its quantization.dataset: accuracy measured on the calibration "
                "text says nothing of other text; give held-out text, or null for the built-in held-out split"
            )
        if files := checked.corpus_files("accuracy.dataset"):
            inputs["dataset"] = files
        # Served adapters: each processed adapter and each precision's LoRA graph.
        if adapters := checked.lora_adapters:
            inputs |= {f"adapter_{a}": targets.path(targets.LORA_ADAPTER, model=model, adapter=a) for a in adapters}
            for p in self._accuracy_precisions(model):
                inputs[f"lora_graph_{p}"] = targets.path(targets.LORA_GRAPH, model=model, precision=p)
        return inputs

    def accuracy_options(self, model: str) -> str:
        """The flags that decide the report (recorded): the exports compared (fp16 and the configured precisions;
        their content is tracked through their manifests), the held-out text and how much of it."""
        accuracy = self.facts.model(model).settings.accuracy
        flags = [
            "--export " + shlex.quote(f"{p}={os.path.dirname(targets.export_path(LLM, MANIFEST, model, p))}")
            for p in self._accuracy_precisions(model)
        ]
        for adapter in self.facts.model(model).lora_adapters:
            where = os.path.dirname(targets.path(targets.LORA_ADAPTER, model=model, adapter=adapter))
            flags.append("--adapter " + shlex.quote(f"{adapter}={where}"))
        flags.append(f"--model {shlex.quote(model)} --samples {accuracy.samples} --tokens {accuracy.tokens}")
        if accuracy.dataset:
            flags.append(f"--dataset {shlex.quote(accuracy.dataset)}")
        return " ".join(flags)

    def _accuracy_jobs(self, model: str) -> list[tuple[str, str, str]]:
        """The jobs behind the accuracy report, in the chain's order: (name, benchmark file, what it wrote); with
        served adapters, each precision's insert-lora and each adapter's process-lora."""
        precisions = self._accuracy_precisions(model)
        checked = self.facts.model(model)
        jobs = []
        quantized = [p for p in precisions if self.quantized_manifest(model, p)]
        if any(checked.precision(p).from_statistics for p in quantized):
            calibrated = targets.path(targets.CALIBRATION_MANIFEST, model=model)
            jobs.append(("calibrate-llm", targets.path(targets.CALIBRATE_BENCHMARK, model=model), calibrated))
        for p in quantized:
            wildcards = {"model": model, "precision": p}
            made = targets.path(targets.QUANTIZED, **wildcards)
            jobs.append((f"quantize-llm {p}", targets.path(targets.QUANTIZE_BENCHMARK, **wildcards), made))
        for p in precisions:
            made = targets.export_path(LLM, MANIFEST, model, p)
            benchmark = targets.path(targets.EXPORT_LLM_BENCHMARK, model=model, precision=p)
            jobs.append((f"export-llm {p}", benchmark, made))
        if adapters := checked.lora_adapters:
            for p in precisions:
                wildcards = {"model": model, "precision": p}
                made = targets.path(targets.LORA_GRAPH, **wildcards)
                jobs.append((f"insert-lora {p}", targets.path(targets.INSERT_LORA_BENCHMARK, **wildcards), made))
            for adapter in adapters:
                wildcards = {"model": model, "adapter": adapter}
                made = targets.path(targets.LORA_ADAPTER, **wildcards)
                jobs.append(
                    (f"process-lora {adapter}", targets.path(targets.PROCESS_LORA_BENCHMARK, **wildcards), made)
                )
        report = targets.path(targets.ACCURACY_REPORT, model=model)
        jobs.append(("accuracy-report", targets.path(targets.ACCURACY_BENCHMARK, model=model), report))
        return jobs

    def job_costs(self, model: str) -> dict[str, Any]:
        """Inputs of job_costs: what each job of the chain wrote, so the table is made again whenever one of them
        ran again. The benchmark files themselves are read, not required: a missing one must not rerun its job."""
        return {f"made_{i}": made for i, (_, _, made) in enumerate(self._accuracy_jobs(model))}

    def job_costs_options(self, model: str) -> str:
        """The jobs and their benchmark files, in the chain's order."""
        flags = [f"--benchmark {shlex.quote(f'{name}={path}')}" for name, path, _ in self._accuracy_jobs(model)]
        return " ".join([*flags, f"--model {shlex.quote(model)}"])
