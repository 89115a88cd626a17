# quantize-llm: HF checkpoint -> ModelOpt fake-quantized checkpoint (contract section 2).
# quantize-draft: EAGLE3 draft -> fake-quantized draft, calibrated through the base (contract 5).


rule quantize_llm:
    input:
        unpack(quantize_llm_inputs),
    output:
        manifest="quantized/{model}_{precision}/manifest.json",
    log:
        "logs/quantize_llm/{model}_{precision}.log",
    benchmark:
        "benchmarks/quantize_llm/{model}_{precision}.tsv"
    conda:
        "../envs/export.yaml"
    threads: quantize_threads
    resources:
        mem_mb=quantize_mem_mb,
        gpu=quantize_gpus,
    params:
        code=step_code("quantize-llm"),
        command=step_command("quantize-llm"),
        checkpoint=source_checkpoint,
        options=quantize_options,
        device=quantize_device,
    shell:
        "{params.command} --model_dir {params.checkpoint:q} --output_dir $(dirname {output.manifest:q})"
        " {params.options} --device {params.device} --threads {threads} > {log:q} 2>&1"


rule quantize_draft:
    input:
        unpack(quantize_draft_inputs),
    output:
        manifest="quantized/{model}/draft_{draft_precision}/manifest.json",
    log:
        "logs/quantize_draft/{model}_{draft_precision}.log",
    benchmark:
        "benchmarks/quantize_draft/{model}_{draft_precision}.tsv"
    conda:
        "../envs/export.yaml"
    threads: quantize_threads
    resources:
        mem_mb=quantize_draft_mem_mb,
        gpu=quantize_gpus,
    params:
        code=step_code("quantize-draft"),
        command=step_command("quantize-draft"),
        base=source_checkpoint,
        draft=draft_checkpoint,
        options=quantize_draft_options,
        device=quantize_device,
    shell:
        "{params.command} --base_model_dir {params.base:q} --draft_model_dir {params.draft:q}"
        " --output_dir $(dirname {output.manifest:q}) {params.options} --device {params.device}"
        " --threads {threads} > {log:q} 2>&1"
