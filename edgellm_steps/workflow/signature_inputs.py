"""What verify_signature jobs read and the flags they pass: the signed part of a model, its signature and key.

A part of :class:`~edgellm_steps.workflow.rule_inputs.RuleInputs`, kept apart as the rules of one step.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

from edgellm_steps.artifacts.signatures import KEYLESS, SignatureSpec
from edgellm_steps.errors import ConfigError
from edgellm_steps.workflow import targets
from edgellm_steps.workflow.model_facts import Facts


class SignatureInputs:
    """Inputs and options of verify_signature, answered from the checked facts."""

    facts: Facts

    def _signed_part(self, model: str, signed: str) -> tuple[Path, SignatureSpec, list[str]]:
        """The directory behind ``signatures/<model>/<signed>.json``, its signature and its content stamps."""
        checked = self.facts.model(model)
        if signed == targets.SIGNED_SOURCE:
            part, path, spec = "source", checked.source.path, checked.settings.signature
            content = checked.source_content_stamps if spec else []
        elif signed == targets.SIGNED_DRAFT:
            part, path, spec = "draft", checked.draft_checkpoint, checked.settings.draft.signature
            content = checked.draft_content_stamps if spec else []
        else:
            adapter = signed.removeprefix("lora/")
            part, path = f"adapter '{adapter}'", checked.adapter_checkpoint(adapter)
            spec = checked.settings.lora[adapter].signature
            content = checked.adapter_content_stamps(adapter) if spec else []
        if spec is None:
            raise ConfigError(
                f"model '{model}' {part} declares no signature, so signatures/{model}/{signed}.json is not a target; "
                "add signature: {file: <model_signing bundle>, public_key: <PEM>} beside its source"
            )
        checked.signed(content, spec, signed)  # its files exist
        return path, spec, content

    def verify_signature(self, model: str, signed: str) -> dict[str, Any]:
        """Inputs of verify_signature: the signature, the key or certificates it is checked with, and the content
        stamps of the signed directory, so a changed signature, key or signed file re-verifies."""
        _, spec, content = self._signed_part(model, signed)
        return {"signature": spec.file, "trust": list(spec.trust_files), "content": content}

    def signed_directory(self, model: str, signed: str) -> str:
        """The directory verify-signature checks (not recorded: its content is, through its stamps)."""
        return str(self._signed_part(model, signed)[0])

    def signature_options(self, model: str, signed: str) -> str:
        """How verify-signature checks the signature: its key or certificates (inputs, so not recorded here)."""
        spec = self._signed_part(model, signed)[1]
        if spec.method == KEYLESS:
            return f"--identity {shlex.quote(spec.identity)} --oidc_issuer {shlex.quote(spec.oidc_issuer)}"
        return f"--{spec.method} " + " ".join(shlex.quote(path) for path in spec.trust_files)

    def signature_method(self, model: str, signed: str) -> str:
        """Recorded: the method, and a keyless signer's identity, decide what a verification accepts."""
        spec = self._signed_part(model, signed)[1]
        return spec.describe() if spec.method == KEYLESS else spec.method
