# TensorRT engines: one per (model, precision, SM target), built on a GPU of that SM.
# The `.engine` target is the runtime's engine directory (llm.engine, config.json, sidecars);
# a vision-language model's also holds visual/, its vision engine (built once per model and SM,
# whatever the language model's precision, and linked in); a model with LoRA adapters builds from
# lora_model.onnx and links each processed adapter in lora/<adapter>.


localrules:
    link_default_engine,


rule build_engine:
    input:
        unpack(engine_inputs),
    output:
        engine=directory("engines/sm{sm}/{model}_{precision}.engine"),
    log:
        "logs/build_engine/sm{sm}/{model}_{precision}.log",
    benchmark:
        "benchmarks/build_engine/sm{sm}/{model}_{precision}.tsv"
    conda:
        "../envs/engine.yaml"
    resources:
        gpu=1,
        mem_mb=engine_mem_mb,
        constraint=engine_constraint,
        slurm_partition=engine_partition,
    params:
        code=step_code("build-engine"),
        command=step_command("build-engine"),
        sm=engine_sm,
        limits=engine_limits,
        plugin=engine_plugin,
        visual=engine_visual_option,
        draft=engine_draft_option,
        lora=engine_lora_option,
    shell:
        # Slurm sets CUDA_VISIBLE_DEVICES for the GPU it allocated; a local run uses GPU 0
        # (profiles/local runs one GPU job at a time).
        "CUDA_VISIBLE_DEVICES=${{CUDA_VISIBLE_DEVICES:-0}} {params.command} --onnx_dir $(dirname {input.manifest:q}) --engine_dir {output.engine:q}"
        " --sm {params.sm} {params.limits} {params.plugin} {params.visual} {params.draft} {params.lora}"
        " > {log:q} 2>&1"


rule build_draft_engine:
    input:
        manifest="onnx/{model}_{precision}/draft/manifest.json",
    output:
        engine=directory("engines/sm{sm}/draft/{model}_{precision}.engine"),
    log:
        "logs/build_draft_engine/sm{sm}/{model}_{precision}.log",
    benchmark:
        "benchmarks/build_draft_engine/sm{sm}/{model}_{precision}.tsv"
    conda:
        "../envs/engine.yaml"
    resources:
        gpu=1,
        mem_mb=engine_mem_mb,
        constraint=engine_constraint,
        slurm_partition=engine_partition,
    params:
        code=step_code("build-engine"),
        command=step_command("build-engine"),
        sm=draft_engine_sm,
        limits=engine_limits,
        plugin=engine_plugin,
    shell:
        "CUDA_VISIBLE_DEVICES=${{CUDA_VISIBLE_DEVICES:-0}} {params.command} --onnx_dir $(dirname {input.manifest:q}) --engine_dir {output.engine:q}"
        " --sm {params.sm} {params.limits} {params.plugin} > {log:q} 2>&1"


rule build_visual_engine:
    input:
        manifest="onnx/{model}/visual/manifest.json",
    output:
        engine=directory("engines/sm{sm}/visual/{model}.engine"),
    log:
        "logs/build_visual_engine/sm{sm}/{model}.log",
    benchmark:
        "benchmarks/build_visual_engine/sm{sm}/{model}.tsv"
    conda:
        "../envs/engine.yaml"
    resources:
        gpu=1,
        mem_mb=engine_mem_mb,
        constraint=engine_constraint,
        slurm_partition=engine_partition,
    params:
        code=step_code("build-engine"),
        command=step_command("build-engine"),
        sm=visual_engine_sm,
        limits=visual_engine_limits,
        plugin=engine_plugin,
    shell:
        "CUDA_VISIBLE_DEVICES=${{CUDA_VISIBLE_DEVICES:-0}} {params.command} --onnx_dir $(dirname {input.manifest:q}) --engine_dir {output.engine:q}"
        " --sm {params.sm} {params.limits} {params.plugin} > {log:q} 2>&1"


rule link_default_engine:
    input:
        engine=default_sm_engine,
    output:
        link=directory("engines/{model}_{precision}.engine"),
    log:
        "logs/link_default_engine/{model}_{precision}.log",
    conda:
        "../envs/coreutils.yaml"
    params:
        target=relative_to_link,
    shell:
        "ln -sfn {params.target:q} {output.link:q} > {log:q} 2>&1"
