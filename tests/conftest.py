"""Fixtures and pytest hooks only: tiny real checkpoints (made once per session) and work directories.

Helpers and constants that test modules import live in support.py; pytest loads this file itself.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from edgellm_steps.models.demo import make_checkpoint

from .support import TINY_CASES, as_transformers4_config, lay_out_workdir

#: Seconds each long module takes (summed test durations of a full run on the 2-core machine, rounded); the
#: others take a few seconds. Only their order matters: re-measure when a module grows or shrinks much.
MODULE_SECONDS = {
    "test_workflow_quantized": 104,
    "test_lora_workflow": 85,
    "test_demo": 83,
    "test_eagle_workflow": 82,
    "test_interruption": 77,
    "test_unified_sources": 69,
    "test_slurm": 58,
    "test_workflow": 57,
    "test_phi4mm": 56,
    "test_planning_errors": 52,
    "test_prequantized": 45,
    "test_quantize": 39,
    "test_vlm_workflow": 35,
    "test_internvl_workflow": 34,
    "test_layerwise": 25,
    "test_block_fp8": 25,
    "test_internvl": 24,
    "test_qwen3_vl_workflow": 21,
    "test_verify_floor": 20,
    "test_quantize_draft": 18,
    "test_reproducible_quantize": 15,
    "test_export_llm": 15,
    "test_lora": 13,
    "test_shell_safety": 12,
    "test_bad_sources": 11,
}


def pytest_collection_modifyitems(items):
    """The longest modules first, each module's tests in order.

    xdist's loadfile hands out modules in collection order when told not to reorder them by test count
    (``--no-loadscope-reorder``, as ``make test`` runs it): the longest first, and the short ones last to fill
    the gaps, keeps the two workers busy to the end instead of leaving one running a long module alone.
    """
    items.sort(key=lambda item: -MODULE_SECONDS.get(item.module.__name__.rsplit(".", 1)[-1], 0))


@pytest.fixture(scope="session")
def checkpoint_factory(tmp_path_factory):
    """``checkpoint_factory(case)`` -> a tiny checkpoint directory, made once per session."""
    made: dict[str, Path] = {}

    def factory(case: str, **overrides) -> Path:
        key = case + repr(sorted(overrides.items()))
        if key not in made:
            options = copy.deepcopy({**TINY_CASES.get(case, {}), **overrides})
            family = options.pop("family", case)
            legacy = options.pop("legacy_config", False)
            made[key] = make_checkpoint(tmp_path_factory.mktemp(case) / "ckpt", family=family, **options)
            if legacy:
                as_transformers4_config(made[key] / "config.json")
        return made[key]

    return factory


@pytest.fixture(scope="session")
def exported(checkpoint_factory, tmp_path_factory):
    """``exported(case)`` -> (checkpoint, export dir) of a tiny case, exported once per session."""
    from edgellm_steps.export.export_llm import export_llm

    done = {}

    def export(case: str):
        if case not in done:
            checkpoint = checkpoint_factory(case)
            out = tmp_path_factory.mktemp(f"export-{case}") / "llm"
            export_llm(checkpoint, out)
            done[case] = (checkpoint, out)
        return done[case]

    return export


@pytest.fixture
def workdir(request, tmp_path, checkpoint_factory):
    """A fresh work directory laid out as the requesting module's ``WORKDIR`` (a support.WorkdirLayout) says.

    One fixture for every workflow module, so that what differs between them (checkpoint, draft or
    adapters, config) is data each module states, not five copies of the same setup.
    """
    layout = getattr(request.module, "WORKDIR", None)
    if layout is None:
        pytest.fail(f"{request.module.__name__} uses the workdir fixture but defines no WORKDIR = WorkdirLayout(...)")
    return lay_out_workdir(tmp_path, layout, checkpoint_factory)
