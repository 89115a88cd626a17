"""The workflow's file paths, its user interface, each spelled once: the rules, the planner and the demo read them.

Templates hold Snakemake wildcards (``{model}``, ``{precision}``, ``{sm}``, ...); :func:`path` fills
them. The wildcard patterns below keep every path unambiguous; a precision is matched loosely
here and checked against the format table at planning, so a misspelled one gets the grammar in one
line instead of "no rule to produce".
"""

from __future__ import annotations

from edgellm_steps.export.kinds import VISUAL, ExportKind

#: ``<model>+<adapter>``: the variant of a model with one of its ``merge: true`` adapters folded in.
VARIANT_SEPARATOR = "+"
_NAME = r"[A-Za-z0-9][A-Za-z0-9.\-]*"

#: Snakemake's ``wildcard_constraints``.
WILDCARDS = {
    # A model, or a merged variant <model>+<adapter> (the model with a merge: true adapter folded in).
    "model": rf"{_NAME}(\{VARIANT_SEPARATOR}{_NAME})?",
    "base": _NAME,
    "precision": r"[A-Za-z0-9_\-]+",
    "sm": r"\d+",
    "draft_precision": r"[A-Za-z0-9_\-]+",
    "adapter": _NAME,
    # What a signature stamp stands for: the model's source, its draft, or one of its adapters.
    "signed": rf"source|draft|lora/{_NAME}",
}

#: The model's shared calibration pass (calibrate-llm): the statistics every precision but AWQ's is made from.
CALIBRATION = "calibration/{model}"
CALIBRATION_MANIFEST = CALIBRATION + "/manifest.json"
QUANTIZED = "quantized/{model}_{precision}/manifest.json"
QUANTIZED_DRAFT = "quantized/{model}/draft_{draft_precision}/manifest.json"
VOCAB_MAP = "vocab/{model}/vocab_map.safetensors"
VOCAB_MANIFEST = "vocab/{model}/manifest.json"
MERGED = "merged/{base}" + VARIANT_SEPARATOR + "{adapter}"
MERGED_MANIFEST = MERGED + "/manifest.json"
#: A block-FP8 release's float checkpoint (dequantize-fp8): what every other step of that model reads.
DEQUANTIZED = "dequantized/{model}"
DEQUANTIZED_MANIFEST = DEQUANTIZED + "/manifest.json"
LORA_ADAPTER = "lora/{model}/{adapter}/processed_adapter_model.safetensors"
LORA_CONFIG = "lora/{model}/{adapter}/config.json"
LORA_MANIFEST = "lora/{model}/{adapter}/manifest.json"
LORA_GRAPH = "onnx/{model}_{precision}/llm/lora_model.onnx"
ENGINE = "engines/sm{sm}/{model}_{precision}.engine"
DEFAULT_ENGINE = "engines/{model}_{precision}.engine"
DRAFT_ENGINE = "engines/sm{sm}/draft/{model}_{precision}.engine"
VISUAL_ENGINE = "engines/sm{sm}/visual/{model}.engine"
VERIFY_REPORT = "reports/{model}_{precision}/verify.json"
VISUAL_REPORT = "reports/{model}/visual/verify.json"
LORA_REPORT = "reports/{model}_{precision}/lora/{adapter}/verify.json"
#: The accuracy report of every configured precision of a model: figures, page and plot.
ACCURACY_REPORT = "reports/{model}/accuracy.json"
ACCURACY_PAGE = "reports/{model}/accuracy.html"
ACCURACY_PLOT = "reports/{model}/accuracy.png"
#: The wall time and peak memory of the jobs behind that report, from their benchmark files.
JOB_COSTS = "reports/{model}/jobs.json"
JOB_COSTS_PAGE = "reports/{model}/jobs.html"
#: Where Snakemake measures the jobs of that chain (each rule's ``benchmark:``).
CALIBRATE_BENCHMARK = "benchmarks/calibrate_llm/{model}.tsv"
QUANTIZE_BENCHMARK = "benchmarks/quantize_llm/{model}_{precision}.tsv"
EXPORT_LLM_BENCHMARK = "benchmarks/export_llm/{model}_{precision}.tsv"
ACCURACY_BENCHMARK = "benchmarks/accuracy_report/{model}.tsv"
INSERT_LORA_BENCHMARK = "benchmarks/insert_lora/{model}_{precision}.tsv"
PROCESS_LORA_BENCHMARK = "benchmarks/process_lora/{model}/{adapter}.tsv"
#: verify-signature's stamp: ``{signed}`` is ``source``, ``draft`` or ``lora/<adapter>``.
SIGNATURE = "signatures/{model}/{signed}.json"
SIGNED_SOURCE, SIGNED_DRAFT, SIGNED_ADAPTER = "source", "draft", "lora/{adapter}"


def export_dir(kind: ExportKind) -> str:
    """An export's directory: per precision, but the vision encoder's is shared by every precision."""
    return f"onnx/{{model}}/{kind.directory}" if kind is VISUAL else f"onnx/{{model}}_{{precision}}/{kind.directory}"


def export_file(kind: ExportKind, name: str) -> str:
    return f"{export_dir(kind)}/{name}"


def export_path(kind: ExportKind, name: str, model: str, precision: str | None = None) -> str:
    """File ``name`` of a model's export of ``kind`` (the vision encoder's takes no precision)."""
    return path(export_file(kind, name), model=model, precision=precision)


def export_outputs(kind: ExportKind) -> dict[str, str]:
    """The files an export rule declares, by name (``model.onnx`` -> ``model``; the manifest as ``manifest``)."""
    return {name.split(".")[0]: export_file(kind, name) for name in kind.files}


def path(template: str, **wildcards: object) -> str:
    """``template`` with its wildcards filled."""
    return template.format(**wildcards)


def variant(model: str, adapter: str) -> str:
    return f"{model}{VARIANT_SEPARATOR}{adapter}"


def split_variant(model: str) -> tuple[str, str | None]:
    """(the configured model, the merged adapter or None) of a target's ``{model}``."""
    base, _, adapter = model.partition(VARIANT_SEPARATOR)
    return base, adapter or None
