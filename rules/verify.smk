# verify-onnx: an export's logits against transformers', on the CPU (optional target);
# a vision encoder export against the transformers vision tower; an LLM export's lora_model.onnx with
# one adapter against the model with PEFT's adapter applied.


rule verify_onnx:
    input:
        unpack(ask(INPUTS.verify_onnx, "model", "precision")),
    output:
        report=report(
            targets.VERIFY_REPORT,
            category="Verify",
            labels={"model": "{model}", "export": "{precision}"},
        ),
    log:
        "logs/verify_onnx/{model}_{precision}.log",
    benchmark:
        "benchmarks/verify_onnx/{model}_{precision}.tsv"
    conda:
        "../envs/export.yaml"
    threads: ask(RESOURCES.verify_threads, "model")
    resources:
        mem_mb=ask(RESOURCES.verify_mem_mb, "model", "precision"),
    params:
        **step(steps.VERIFY_ONNX),
        checkpoint=ask_unrecorded(INPUTS.export_checkpoint, "model", "precision"),
        adapter="",
    shell:
        "{params.command} --onnx_dir $(dirname {input.manifest:q}) --model_dir {params.checkpoint:q}"
        " {params.adapter} --report {output.report:q} --threads {threads} > {log:q} 2>&1"


use rule verify_onnx as verify_visual with:
    input:
        unpack(ask(INPUTS.verify_visual, "model")),
    output:
        report=report(
            targets.VISUAL_REPORT,
            category="Verify",
            labels={"model": "{model}", "export": "visual"},
        ),
    log:
        "logs/verify_visual/{model}.log",
    benchmark:
        "benchmarks/verify_visual/{model}.tsv"
    resources:
        mem_mb=ask(RESOURCES.verify_visual_mem_mb, "model"),
    params:
        **step(steps.VERIFY_ONNX),
        checkpoint=ask_unrecorded(INPUTS.checkpoint, "model"),
        adapter="",


use rule verify_onnx as verify_lora with:
    input:
        unpack(ask(INPUTS.verify_lora, "model", "precision", "adapter")),
    output:
        report=report(
            targets.LORA_REPORT,
            category="Verify",
            labels={"model": "{model}", "export": "{precision} + {adapter}"},
        ),
    log:
        "logs/verify_lora/{model}_{precision}/{adapter}.log",
    benchmark:
        "benchmarks/verify_lora/{model}_{precision}/{adapter}.tsv"
    params:
        **step(steps.VERIFY_ONNX),
        checkpoint=ask_unrecorded(INPUTS.export_checkpoint, "model", "precision"),
        adapter=ask_unrecorded(INPUTS.adapter_option, "model", "adapter"),


# The accuracy report of a model: every configured precision's LLM export (and fp16's) run on held-out
# text; perplexity, agreement with fp16, size. Its page and plot, and every verify report, go into
# `snakemake --report`.
rule accuracy_report:
    input:
        unpack(ask(INPUTS.accuracy_report, "model")),
    output:
        report=targets.ACCURACY_REPORT,
        page=report(
            targets.ACCURACY_PAGE,
            category="Accuracy",
            labels={"model": "{model}", "figure": "table"},
        ),
        plot=report(
            targets.ACCURACY_PLOT,
            category="Accuracy",
            labels={"model": "{model}", "figure": "plot"},
        ),
    log:
        "logs/accuracy_report/{model}.log",
    benchmark:
        targets.ACCURACY_BENCHMARK
    conda:
        "../envs/export.yaml"
    threads: ask(RESOURCES.verify_threads, "model")
    resources:
        mem_mb=ask(RESOURCES.accuracy_mem_mb, "model"),
    params:
        **step(steps.ACCURACY_REPORT),
        options=ask(INPUTS.accuracy_options, "model"),
        checkpoint=ask_unrecorded(INPUTS.checkpoint, "model"),
    shell:
        "{params.command} {params.options} --model_dir {params.checkpoint:q} --report {output.report:q}"
        " --page {output.page:q} --plot {output.plot:q} > {log:q} 2>&1"


# What the jobs behind the accuracy report cost: wall time and peak memory from their benchmarks/ files
# (read, not required: a deleted one is listed as not measured, and never reruns its job). Cheap, so local.
localrules:
    job_costs,


rule job_costs:
    input:
        unpack(ask(INPUTS.job_costs, "model")),
    output:
        report=targets.JOB_COSTS,
        page=report(
            targets.JOB_COSTS_PAGE,
            category="Costs",
            labels={"model": "{model}", "figure": "jobs"},
        ),
    log:
        "logs/job_costs/{model}.log",
    conda:
        "../envs/export.yaml"
    params:
        **step(steps.JOB_COSTS),
        options=ask_unrecorded(INPUTS.job_costs_options, "model"),
    shell:
        "{params.command} {params.options} --report {output.report:q} --page {output.page:q} > {log:q} 2>&1"
