# calibrate-llm: HF checkpoint -> the model's shared calibration statistics (every precision but AWQ's).
# quantize-llm: HF checkpoint (+ those statistics) -> ModelOpt fake-quantized checkpoint (contract section 2).
# quantize-draft: EAGLE3 draft -> fake-quantized draft, calibrated through the base (contract 5).


rule calibrate_llm:
    input:
        unpack(ask(INPUTS.calibrate_llm, "model")),
    output:
        manifest=targets.CALIBRATION_MANIFEST,
    log:
        "logs/calibrate_llm/{model}.log",
    benchmark:
        targets.CALIBRATE_BENCHMARK
    conda:
        "../envs/export.yaml"
    threads: ask(RESOURCES.quantize_threads, "model")
    resources:
        mem_mb=ask(RESOURCES.calibrate_mem_mb, "model"),
        gpu=ask(RESOURCES.quantize_gpus, "model"),
    params:
        **step(steps.CALIBRATE_LLM),
        checkpoint=ask_unrecorded(INPUTS.checkpoint, "model"),
        options=ask(INPUTS.calibrate_options, "model"),
        device=ask_unrecorded(INPUTS.quantize_device, "model"),
    shell:
        "{params.command} --model_dir {params.checkpoint:q} --output_dir $(dirname {output.manifest:q})"
        " {params.options} --device {params.device} --threads {threads} > {log:q} 2>&1"


rule quantize_llm:
    input:
        unpack(ask(INPUTS.quantize_llm, "model", "precision")),
    output:
        manifest=targets.QUANTIZED,
    log:
        "logs/quantize_llm/{model}_{precision}.log",
    benchmark:
        targets.QUANTIZE_BENCHMARK
    conda:
        "../envs/export.yaml"
    threads: ask(RESOURCES.quantize_threads, "model")
    resources:
        mem_mb=ask(RESOURCES.quantize_mem_mb, "model", "precision"),
        gpu=ask(RESOURCES.quantize_gpus, "model"),
    params:
        **step(steps.QUANTIZE_LLM),
        checkpoint=ask_unrecorded(INPUTS.checkpoint, "model"),
        options=ask(INPUTS.quantize_options, "model", "precision"),
        device=ask_unrecorded(INPUTS.quantize_device, "model"),
    shell:
        "{params.command} --model_dir {params.checkpoint:q} --output_dir $(dirname {output.manifest:q})"
        " {params.options} --device {params.device} --threads {threads} > {log:q} 2>&1"


rule quantize_draft:
    input:
        unpack(ask(INPUTS.quantize_draft, "model", "draft_precision")),
    output:
        manifest=targets.QUANTIZED_DRAFT,
    log:
        "logs/quantize_draft/{model}_{draft_precision}.log",
    benchmark:
        "benchmarks/quantize_draft/{model}_{draft_precision}.tsv"
    conda:
        "../envs/export.yaml"
    threads: ask(RESOURCES.quantize_threads, "model")
    resources:
        mem_mb=ask(RESOURCES.quantize_draft_mem_mb, "model"),
        gpu=ask(RESOURCES.quantize_gpus, "model"),
    params:
        **step(steps.QUANTIZE_DRAFT),
        base=ask_unrecorded(INPUTS.checkpoint, "model"),
        draft=ask_unrecorded(INPUTS.draft_checkpoint, "model"),
        options=ask(INPUTS.quantize_draft_options, "model"),
        device=ask_unrecorded(INPUTS.quantize_device, "model"),
    shell:
        "{params.command} --base_model_dir {params.base:q} --draft_model_dir {params.draft:q}"
        " --output_dir $(dirname {output.manifest:q}) {params.options} --device {params.device}"
        " --threads {threads} > {log:q} 2>&1"


# dequantize-fp8: a block-FP8 release (Qwen's, DeepSeek's *-FP8) -> the float checkpoint all its other jobs read.
rule dequantize_fp8:
    input:
        unpack(ask(INPUTS.dequantize_fp8, "model")),
    output:
        manifest=targets.DEQUANTIZED_MANIFEST,
    log:
        "logs/dequantize_fp8/{model}.log",
    benchmark:
        "benchmarks/dequantize_fp8/{model}.tsv"
    conda:
        "../envs/export.yaml"
    resources:
        mem_mb=ask(RESOURCES.dequantize_mem_mb, "model"),
    params:
        **step(steps.DEQUANTIZE_FP8),
        source=ask_unrecorded(INPUTS.release_checkpoint, "model"),
    shell:
        "{params.command} --model_dir {params.source:q} --output_dir $(dirname {output.manifest:q}) > {log:q} 2>&1"
