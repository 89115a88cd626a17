"""ModelOpt's ``mtq.quantize`` on one calibration stage (a decoder layer, the head) under whole-model names.

Both layer-by-layer passes use it: the statistics pass (``activation_statistics.py``) and the per-precision
quantization (``layerwise.py``).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

#: ModelOpt's switch for a quantize call that enables no weight quantizer.
SKIP_WEIGHT_CHECK = "MODELOPT_SKIP_WEIGHT_QUANT_CHECK"


def container(modules: dict[str, Any]) -> Any:
    """A module tree holding ``modules`` at their whole-model paths, so quantizer names and recipe patterns
    are the whole model's."""
    import torch

    root = torch.nn.Module()
    for path, module in modules.items():
        parent = root
        parts = path.split(".")
        for part in parts[:-1]:
            if not hasattr(parent, part):
                parent.add_module(part, torch.nn.Module())
            parent = getattr(parent, part)
        parent.add_module(parts[-1], module)
    return root


@contextmanager
def stage_without_weight_quantizers_allowed() -> Iterator[None]:
    """ModelOpt refuses a quantize call that enables no weight quantizer, a guard meant for whole models; a
    stage may rightly have none (the LM head stage of a recipe that leaves the head float, every stage of the
    statistics pass). ModelOpt's own switch for such partial stages, set only for the call."""
    previous = os.environ.get(SKIP_WEIGHT_CHECK)
    os.environ[SKIP_WEIGHT_CHECK] = "1"
    try:
        yield
    finally:
        if previous is None:
            del os.environ[SKIP_WEIGHT_CHECK]
        else:
            os.environ[SKIP_WEIGHT_CHECK] = previous


def quantize_stage(modules: dict[str, Any], config: dict[str, Any], forward_loop: Callable[[Any], None]) -> Any:
    """``mtq.quantize`` of ``modules`` (whole-model names) with a copy of ``config``; the container it converted."""
    import modelopt.torch.quantization as mtq

    root = container(modules)
    with stage_without_weight_quantizers_allowed():
        mtq.quantize(root, copy.deepcopy(config), forward_loop=forward_loop)
    return root


def peak_rss_gib() -> float:
    """This process's peak resident memory so far (Linux reports KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
