# export-llm: HF checkpoint -> Edge-LLM ONNX directory (contract sections 3-4).
# export-visual: a VLM's vision tower -> the vision encoder ONNX directory (contract section 7).
# EAGLE3 (contract section 5), for a model with a draft: the base graph and the draft graph.
# Each export's files are declared by its kind (edgellm_steps/export/kinds.py).


rule export_llm:
    input:
        unpack(ask(INPUTS.export_llm, "model", "precision")),
    output:
        **export_outputs(LLM),
    log:
        "logs/export_llm/{model}_{precision}.log",
    benchmark:
        targets.EXPORT_LLM_BENCHMARK
    conda:
        "../envs/export.yaml"
    threads: ask(RESOURCES.export_threads, "model")
    params:
        **step(steps.EXPORT_LLM),
        checkpoint=ask_unrecorded(INPUTS.export_checkpoint, "model", "precision"),
        options=ask_unrecorded(INPUTS.export_options, "model", "precision"),
        eagle_base="",
    shell:
        "{params.command} --model_dir {params.checkpoint:q} --output_dir $(dirname {output.model:q})"
        " {params.eagle_base} {params.options} --threads {threads} > {log:q} 2>&1"


use rule export_llm as export_eagle_base with:
    input:
        unpack(ask(INPUTS.eagle_base, "model", "precision")),
    output:
        **export_outputs(EAGLE_BASE),
    log:
        "logs/export_eagle_base/{model}_{precision}.log",
    benchmark:
        "benchmarks/export_eagle_base/{model}_{precision}.tsv"
    params:
        **step(steps.EXPORT_LLM),
        checkpoint=ask_unrecorded(INPUTS.export_checkpoint, "model", "precision"),
        options=ask_unrecorded(INPUTS.export_options, "model", "precision"),
        eagle_base="--is_eagle_base",


rule export_visual:
    input:
        unpack(ask(INPUTS.export_visual, "model")),
    output:
        **export_outputs(VISUAL),
    log:
        "logs/export_visual/{model}.log",
    benchmark:
        "benchmarks/export_visual/{model}.tsv"
    conda:
        "../envs/export.yaml"
    threads: ask(RESOURCES.export_threads, "model")
    params:
        **step(steps.EXPORT_VISUAL),
        checkpoint=ask_unrecorded(INPUTS.checkpoint, "model"),
        options=ask(INPUTS.visual_options, "model"),
    shell:
        "{params.command} --model_dir {params.checkpoint:q} --output_dir $(dirname {output.model:q})"
        " {params.options} --threads {threads} > {log:q} 2>&1"


rule export_draft:
    input:
        unpack(ask(INPUTS.export_draft, "model", "precision")),
    output:
        **export_outputs(DRAFT),
    log:
        "logs/export_draft/{model}_{precision}.log",
    benchmark:
        "benchmarks/export_draft/{model}_{precision}.tsv"
    conda:
        "../envs/export.yaml"
    threads: ask(RESOURCES.export_threads, "model")
    params:
        **step(steps.EXPORT_DRAFT),
        draft=ask_unrecorded(INPUTS.draft_export_checkpoint, "model"),
        base=ask_unrecorded(INPUTS.checkpoint, "model"),
    shell:
        "{params.command} --draft_model_dir {params.draft:q} --base_model_dir {params.base:q}"
        " --output_dir $(dirname {output.model:q}) --threads {threads} > {log:q} 2>&1"


rule reduce_vocab:
    input:
        unpack(ask(INPUTS.reduce_vocab, "model")),
    output:
        vocab_map=targets.VOCAB_MAP,
        manifest=targets.VOCAB_MANIFEST,
    log:
        "logs/reduce_vocab/{model}.log",
    conda:
        "../envs/export.yaml"
    params:
        **step(steps.REDUCE_VOCAB),
        checkpoint=ask_unrecorded(INPUTS.checkpoint, "model"),
        options=ask(INPUTS.reduce_vocab_options, "model"),
        draft=ask_unrecorded(INPUTS.reduce_vocab_draft, "model"),
    shell:
        "{params.command} --model_dir {params.checkpoint:q} --output_dir $(dirname {output.vocab_map:q})"
        " {params.options} {params.draft} > {log:q} 2>&1"
