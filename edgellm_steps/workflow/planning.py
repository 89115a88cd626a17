"""What the workflow asks while it plans: one :class:`Planner` per DAG build over a validated config.

The Snakemake rules call it from input and params functions (``rules/common.smk``): the checked
facts per model (``model_facts.py``), each rule's inputs and options (``rule_inputs.py``), each
job's resources (``job_resources.py``) and the target lists of ``all`` and ``export_all``. They raise
:class:`~edgellm_steps.errors.EdgeLLMError` for anything a user can fix; the workflow turns that
into one line and stops before any job runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from edgellm_steps.artifacts.sources import STATE_DIR
from edgellm_steps.errors import ConfigError
from edgellm_steps.export.kinds import DRAFT, EAGLE_BASE, LLM, VISUAL
from edgellm_steps.graph.opsets import ONNX_NAME
from edgellm_steps.workflow import targets
from edgellm_steps.workflow.config import validate_config
from edgellm_steps.workflow.job_resources import JobResources
from edgellm_steps.workflow.model_facts import Facts
from edgellm_steps.workflow.rule_inputs import RuleInputs

CONFIG_CANDIDATES = ("config.yaml", "config/config.yaml")


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


class Planner:
    """Answers the rules' questions about one validated config."""

    def __init__(self, config: dict[str, Any], state_dir: Path = STATE_DIR) -> None:
        self.facts = Facts(config, state_dir)
        self.inputs = RuleInputs(self.facts)
        self.resources = JobResources(self.facts)

    def all_engines(self) -> list[str]:
        """The targets of ``all``: an engine per model, precision and SM target."""
        found = []
        for model in self.facts.names():
            settings = self.facts.model(model).settings
            for precision in settings.precisions:
                found += [
                    targets.path(targets.ENGINE, sm=sm, model=model, precision=precision) for sm in settings.sm_targets
                ]
        return found

    def all_exports(self) -> list[str]:
        """The targets of ``export_all``: every export, LoRA graph and processed adapter of every model."""
        found = []
        for model in self.facts.names():
            checked = self.facts.model(model)
            precisions = checked.settings.precisions
            kinds = [LLM, EAGLE_BASE, DRAFT] if checked.settings.draft is not None else [LLM]
            found += [targets.export_path(LLM, ONNX_NAME, model, p) for p in precisions]
            if checked.vision_language:
                found.append(targets.export_path(VISUAL, ONNX_NAME, model))
            found += [targets.export_path(kind, ONNX_NAME, model, p) for p in precisions for kind in kinds[1:]]
            if adapters := checked.lora_adapters:
                found += [targets.path(targets.LORA_GRAPH, model=model, precision=p) for p in precisions]
                found += [targets.path(targets.LORA_ADAPTER, model=model, adapter=a) for a in adapters]
        return found
