"""The steps' names, spelled once: what a manifest records as its writer, and what rules and CLIs call each step.

Each name is also a console script (``edgellm-<name>``) and a module ``edgellm_steps/cli/<name with _>.py``.
"""

CALIBRATE_LLM = "calibrate-llm"
QUANTIZE_LLM = "quantize-llm"
QUANTIZE_DRAFT = "quantize-draft"
EXPORT_LLM = "export-llm"
EXPORT_VISUAL = "export-visual"
EXPORT_DRAFT = "export-draft"
REDUCE_VOCAB = "reduce-vocab"
INSERT_LORA = "insert-lora"
PROCESS_LORA = "process-lora"
MERGE_LORA = "merge-lora"
DEQUANTIZE_FP8 = "dequantize-fp8"
VERIFY_ONNX = "verify-onnx"
ACCURACY_REPORT = "accuracy-report"
JOB_COSTS = "job-costs"
BUILD_ENGINE = "build-engine"
VERIFY_SIGNATURE = "verify-signature"

#: Every step the workflow runs, in the order of the chain.
ALL = (
    VERIFY_SIGNATURE,
    DEQUANTIZE_FP8,
    CALIBRATE_LLM,
    QUANTIZE_LLM,
    QUANTIZE_DRAFT,
    EXPORT_LLM,
    EXPORT_VISUAL,
    EXPORT_DRAFT,
    REDUCE_VOCAB,
    INSERT_LORA,
    PROCESS_LORA,
    MERGE_LORA,
    VERIFY_ONNX,
    ACCURACY_REPORT,
    JOB_COSTS,
    BUILD_ENGINE,
)
