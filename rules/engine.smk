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
        engine=directory(targets.ENGINE),
    log:
        "logs/build_engine/sm{sm}/{model}_{precision}.log",
    benchmark:
        "benchmarks/build_engine/sm{sm}/{model}_{precision}.tsv"
    conda:
        "../envs/engine.yaml"
    resources:
        gpu=1,
        mem_mb=ask(RESOURCES.engine_mem_mb, "model"),
        constraint=ask(RESOURCES.engine_constraint, "sm"),
        slurm_partition=ask(RESOURCES.engine_partition, "sm"),
    params:
        **step(steps.BUILD_ENGINE),
        sm=ask(INPUTS.engine_sm, "model", "precision", "sm"),
        limits=ask(INPUTS.engine_limits, "model"),
        plugin=ask_unrecorded(INPUTS.engine_plugin),
        parts=ask_unrecorded(INPUTS.engine_parts, "model", "precision", "sm"),
    shell:
        # Slurm sets CUDA_VISIBLE_DEVICES for the GPU it allocated; a local run uses GPU 0
        # (profiles/local runs one GPU job at a time).
        "CUDA_VISIBLE_DEVICES=${{CUDA_VISIBLE_DEVICES:-0}} {params.command} --onnx_dir $(dirname {input.manifest:q})"
        " --engine_dir {output.engine:q} --sm {params.sm} {params.limits} {params.plugin} {params.parts}"
        " > {log:q} 2>&1"


use rule build_engine as build_draft_engine with:
    input:
        unpack(ask(INPUTS.draft_engine, "model", "precision")),
    output:
        engine=directory(targets.DRAFT_ENGINE),
    log:
        "logs/build_draft_engine/sm{sm}/{model}_{precision}.log",
    benchmark:
        "benchmarks/build_draft_engine/sm{sm}/{model}_{precision}.tsv"
    params:
        **step(steps.BUILD_ENGINE),
        sm=ask(INPUTS.draft_engine_sm, "model", "precision", "sm"),
        limits=ask(INPUTS.engine_limits, "model"),
        plugin=ask_unrecorded(INPUTS.engine_plugin),
        parts="",


use rule build_engine as build_visual_engine with:
    input:
        unpack(ask(INPUTS.visual_engine, "model")),
    output:
        engine=directory(targets.VISUAL_ENGINE),
    log:
        "logs/build_visual_engine/sm{sm}/{model}.log",
    benchmark:
        "benchmarks/build_visual_engine/sm{sm}/{model}.tsv"
    params:
        **step(steps.BUILD_ENGINE),
        sm=ask(INPUTS.visual_engine_sm, "model", "sm"),
        limits=ask(INPUTS.visual_engine_limits, "model"),
        plugin=ask_unrecorded(INPUTS.engine_plugin),
        parts="",


rule link_default_engine:
    input:
        engine=ask(INPUTS.default_engine, "model", "precision"),
    output:
        link=directory(targets.DEFAULT_ENGINE),
    log:
        "logs/link_default_engine/{model}_{precision}.log",
    conda:
        "../envs/coreutils.yaml"
    params:
        target=relative_to_link,
    shell:
        "ln -sfn {params.target:q} {output.link:q} > {log:q} 2>&1"
