"""Fixtures and pytest hooks only: tiny real checkpoints (made once per session) and work directories.

Helpers and constants that test modules import live in support.py; pytest loads this file itself.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from edgellm_steps.models.demo import make_checkpoint

from .support import TINY_CASES, as_transformers4_config, lay_out_workdir

#: Modules without Snakemake that still take tens of seconds (real transformers references, ModelOpt runs).
LONG_MODULES = frozenset(
    {
        "test_vlm_end_to_end",
        "test_export_llm",
        "test_quantize",
        "test_quantize_draft",
        "test_visual",
        "test_visual_fp8",
        "test_visual_qwen3",
        "test_qwen3_vl_llm",
        "test_qwen3_vl_end_to_end",
        "test_reproducible_quantize",
        "test_vlm",
        "test_lora",
        "test_layerwise",
        "test_prequantized",
        "test_internvl",
        "test_phi4mm",
        "test_eagle_base",
    }
)


def pytest_collection_modifyitems(items):
    """Modules that drive Snakemake first (they take most of the suite's time), then the other long ones,
    each module's tests in order.

    xdist's loadfile hands out modules in collection order, so a long module collected last
    would leave one worker running alone at the end.
    """

    def rank(item) -> int:
        if item.get_closest_marker("workflow") is not None:
            return 0
        return 1 if item.module.__name__.rsplit(".", 1)[-1] in LONG_MODULES else 2

    items.sort(key=rank)


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
