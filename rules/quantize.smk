# quantize-llm: HF checkpoint -> ModelOpt fake-quantized checkpoint (contract section 2).


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
