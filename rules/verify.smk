# verify-onnx: an export's logits against transformers', on the CPU (optional target);
# a vision encoder export against the transformers vision tower; an LLM export's lora_model.onnx with
# one adapter against the model with PEFT's adapter applied.


rule verify_onnx:
    input:
        unpack(verify_onnx_inputs),
    output:
        report="reports/{model}_{precision}/verify.json",
    log:
        "logs/verify_onnx/{model}_{precision}.log",
    benchmark:
        "benchmarks/verify_onnx/{model}_{precision}.tsv"
    conda:
        "../envs/export.yaml"
    threads: verify_threads
    resources:
        mem_mb=verify_mem_mb,
    params:
        code=step_code("verify-onnx"),
        command=step_command("verify-onnx"),
        checkpoint=export_checkpoint,
    shell:
        "{params.command} --onnx_dir $(dirname {input.manifest:q}) --model_dir {params.checkpoint:q}"
        " --report {output.report:q} --threads {threads} > {log:q} 2>&1"


rule verify_visual:
    input:
        unpack(verify_visual_inputs),
    output:
        report="reports/{model}/visual/verify.json",
    log:
        "logs/verify_visual/{model}.log",
    benchmark:
        "benchmarks/verify_visual/{model}.tsv"
    conda:
        "../envs/export.yaml"
    threads: verify_threads
    resources:
        mem_mb=verify_visual_mem_mb,
    params:
        code=step_code("verify-onnx"),
        command=step_command("verify-onnx"),
        checkpoint=source_checkpoint,
    shell:
        "{params.command} --onnx_dir $(dirname {input.manifest:q}) --model_dir {params.checkpoint:q}"
        " --report {output.report:q} --threads {threads} > {log:q} 2>&1"


rule verify_lora:
    input:
        unpack(verify_lora_inputs),
    output:
        report="reports/{model}_{precision}/lora/{adapter}/verify.json",
    log:
        "logs/verify_lora/{model}_{precision}/{adapter}.log",
    benchmark:
        "benchmarks/verify_lora/{model}_{precision}/{adapter}.tsv"
    conda:
        "../envs/export.yaml"
    threads: verify_threads
    resources:
        mem_mb=verify_mem_mb,
    params:
        code=step_code("verify-onnx"),
        command=step_command("verify-onnx"),
        checkpoint=export_checkpoint,
        adapter=adapter_checkpoint,
    shell:
        "{params.command} --onnx_dir $(dirname {input.manifest:q}) --model_dir {params.checkpoint:q}"
        " --adapter {params.adapter:q} --report {output.report:q} --threads {threads} > {log:q} 2>&1"
