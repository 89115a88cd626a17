"""``quantization.exclude``: decoder Linears a user keeps in fp16 in every quantized precision of a model.

The usual remedy when a precision costs too much accuracy is to leave its most sensitive layers in float.
Patterns are shell-style (``fnmatch``) over the checkpoint's own module names, as its safetensors index
lists them without ``.weight`` (``model.layers.0.*``, ``*.mlp.down_proj``). They pick among the decoder's
Linears: the LM head has its own precision (``-lm<format>``), the embedding table and norms are never
quantized, a vision tower stays float anyway. A pattern that matches none of them is an error (a typo would
otherwise quantize everything silently). Each matched Linear's weight and input quantizers are disabled by
exact name, under the stored name and under the name transformers loads it as (the family's renames), so
the checkpoint holds no scale for it and export-llm writes a float16 GEMM.
"""

from __future__ import annotations

from collections.abc import Iterable
from fnmatch import fnmatchcase

from edgellm_steps.artifacts.checkpoint import TensorStore
from edgellm_steps.errors import PrecisionError
from edgellm_steps.models.families import FamilySpec
from edgellm_steps.quant.checkpoint_record import OpenedCheckpoint
from edgellm_steps.quant.prequantized import HeldPrecision

#: The quantizers of a Linear that an exclusion disables.
LINEAR_QUANTIZERS = ("weight_quantizer", "input_quantizer", "output_quantizer")


def decoder_linears(store: TensorStore, spec: FamilySpec) -> list[str]:
    """The stored module names of the decoder layers' Linears (two-dimensional ``.weight`` tensors)."""
    layers = spec.layer_prefix.split("{i}")[0]
    return sorted(
        name.removesuffix(".weight")
        for name in store.names()
        if name.startswith(layers) and name.endswith(".weight") and len(store.shape(name)) == 2
    )


def excluded_linears(patterns: Iterable[str], linears: list[str], where: str) -> list[str]:
    """The Linears matched by any of ``patterns``; a pattern matching none is refused in one line."""
    matched: set[str] = set()
    for pattern in patterns:
        hits = [name for name in linears if fnmatchcase(name, pattern)]
        if not hits:
            example = linears[-1] if linears else "(none)"
            raise PrecisionError(
                f"quantization.exclude pattern '{pattern}' matches no decoder Linear of {where} (they are named "
                f"like {example}); fix the pattern (shell-style: 'model.layers.0.*', '*.mlp.down_proj')"
            )
        matched.update(hits)
    if linears and matched == set(linears):
        raise PrecisionError(
            f"quantization.exclude matches every decoder Linear of {where}, so nothing would be quantized; "
            "narrow the patterns, or build precision fp16"
        )
    return sorted(matched)


def exclusion_patterns(linears: Iterable[str], renames: tuple[tuple[str, str], ...]) -> tuple[str, ...]:
    """ModelOpt quantizer names that disable ``linears``: each under its stored name and, for a family whose
    modules transformers renames on load, under the loaded name too (a name that matches nothing is inert)."""
    names: list[str] = []
    for linear in linears:
        candidates = [linear]
        candidates += [module + linear.removeprefix(stored) for stored, module in renames if linear.startswith(stored)]
        names += [f"{name}.{quantizer}" for name in candidates for quantizer in LINEAR_QUANTIZERS]
    return tuple(names)


def source_exclusions(
    patterns: tuple[str, ...], opened: OpenedCheckpoint, held: HeldPrecision | None, where: str
) -> list[str]:
    """``patterns`` resolved against ``opened``'s decoder Linears ([] for none). A source that ``held`` a precision
    already has no float weights to keep: exclusions on it are refused, not ignored."""
    if not patterns:
        return []
    if held is not None:
        raise PrecisionError(
            f"{where} is already quantized as {held.precision}, so quantization.exclude cannot keep its Linears in "
            "float; remove quantization.exclude, or give the unquantized source to quantize here"
        )
    store = TensorStore(opened.path)
    return excluded_linears(patterns, decoder_linears(store, opened.spec.resolved(store.names())), where)
