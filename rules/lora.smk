# LoRA (contract 6), for a model with `lora:` adapters: insert-lora adds the LoRA inputs to each LLM
# export (lora_model.onnx beside model.onnx, reading no weights), process-lora turns each PEFT adapter
# into the runtime's tensors once per model, whatever the precision.


rule insert_lora:
    input:
        unpack(insert_lora_inputs),
    output:
        lora="onnx/{model}_{precision}/llm/lora_model.onnx",
    log:
        "logs/insert_lora/{model}_{precision}.log",
    benchmark:
        "benchmarks/insert_lora/{model}_{precision}.tsv"
    conda:
        "../envs/export.yaml"
    params:
        code=step_code("insert-lora"),
        command=step_command("insert-lora"),
    shell:
        "{params.command} --onnx_dir $(dirname {input.manifest:q}) > {log:q} 2>&1"


rule process_lora:
    input:
        unpack(process_lora_inputs),
    output:
        weights="lora/{model}/{adapter}/processed_adapter_model.safetensors",
        config="lora/{model}/{adapter}/config.json",
        manifest="lora/{model}/{adapter}/manifest.json",
    log:
        "logs/process_lora/{model}/{adapter}.log",
    benchmark:
        "benchmarks/process_lora/{model}/{adapter}.tsv"
    conda:
        "../envs/export.yaml"
    params:
        code=step_code("process-lora"),
        command=step_command("process-lora"),
        adapter=adapter_checkpoint,
        checkpoint=source_checkpoint,
    shell:
        "{params.command} --input_dir {params.adapter:q} --output_dir $(dirname {output.manifest:q})"
        " --model_dir {params.checkpoint:q} > {log:q} 2>&1"


rule merge_lora:
    input:
        unpack(merge_lora_inputs),
    output:
        manifest="merged/{base}+{adapter}/manifest.json",
    log:
        "logs/merge_lora/{base}+{adapter}.log",
    benchmark:
        "benchmarks/merge_lora/{base}+{adapter}.tsv"
    conda:
        "../envs/export.yaml"
    resources:
        mem_mb=merge_lora_mem_mb,
    params:
        code=step_code("merge-lora"),
        command=step_command("merge-lora"),
        checkpoint=merge_base_checkpoint,
        adapter=merge_adapter_checkpoint,
    shell:
        "{params.command} --model_dir {params.checkpoint:q} --adapter_dir {params.adapter:q}"
        " --output_dir $(dirname {output.manifest:q}) > {log:q} 2>&1"
