# TensorRT Edge-LLM artifacts, built incrementally: see README.md for targets and config.
from snakemake.utils import min_version

min_version("9.0")


include: "rules/common.smk"
include: "rules/signatures.smk"
include: "rules/quantize.smk"
include: "rules/export.smk"
include: "rules/lora.smk"
include: "rules/engine.smk"
include: "rules/verify.smk"


rule all:
    default_target: True
    input:
        all_engine_targets(),


# A function, so the sources are read only when export_all is the target.
rule export_all:
    input:
        lambda wildcards: all_export_targets(),
