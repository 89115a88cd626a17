# LoRA (contract 6), for a model with `lora:` adapters: insert-lora adds the LoRA inputs to each LLM
# export (lora_model.onnx beside model.onnx, reading no weights), process-lora turns each PEFT adapter
# into the runtime's tensors once per model, whatever the precision; merge-lora folds a `merge: true`
# adapter into the model's weights (the variant <model>+<adapter>).


rule insert_lora:
    input:
        unpack(ask(INPUTS.insert_lora, "model", "precision")),
    output:
        lora=targets.LORA_GRAPH,
    log:
        "logs/insert_lora/{model}_{precision}.log",
    benchmark:
        targets.INSERT_LORA_BENCHMARK
    conda:
        "../envs/export.yaml"
    params:
        **step(steps.INSERT_LORA),
    shell:
        "{params.command} --onnx_dir $(dirname {input.manifest:q}) > {log:q} 2>&1"


rule process_lora:
    input:
        unpack(ask(INPUTS.process_lora, "model", "adapter")),
    output:
        weights=targets.LORA_ADAPTER,
        config=targets.LORA_CONFIG,
        manifest=targets.LORA_MANIFEST,
    log:
        "logs/process_lora/{model}/{adapter}.log",
    benchmark:
        targets.PROCESS_LORA_BENCHMARK
    conda:
        "../envs/export.yaml"
    params:
        **step(steps.PROCESS_LORA),
        adapter=ask_unrecorded(INPUTS.adapter_checkpoint, "model", "adapter"),
        checkpoint=ask_unrecorded(INPUTS.checkpoint, "model"),
    shell:
        "{params.command} --input_dir {params.adapter:q} --output_dir $(dirname {output.manifest:q})"
        " --model_dir {params.checkpoint:q} > {log:q} 2>&1"


rule merge_lora:
    input:
        unpack(ask(INPUTS.merge_lora, "base", "adapter")),
    output:
        manifest=targets.MERGED_MANIFEST,
    log:
        "logs/merge_lora/{base}+{adapter}.log",
    benchmark:
        "benchmarks/merge_lora/{base}+{adapter}.tsv"
    conda:
        "../envs/export.yaml"
    resources:
        mem_mb=ask(RESOURCES.merge_lora_mem_mb, "base", "adapter"),
    params:
        **step(steps.MERGE_LORA),
        checkpoint=ask_unrecorded(INPUTS.checkpoint, "base"),
        adapter=ask_unrecorded(INPUTS.adapter_checkpoint, "base", "adapter"),
    shell:
        "{params.command} --model_dir {params.checkpoint:q} --adapter_dir {params.adapter:q}"
        " --output_dir $(dirname {output.manifest:q}) > {log:q} 2>&1"
