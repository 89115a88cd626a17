# export-llm: HF checkpoint -> Edge-LLM ONNX directory (contract sections 3-4).
# export-visual: a VLM's vision tower -> the vision encoder ONNX directory (contract section 7).
# EAGLE3 (contract section 5), for a model with a draft: the base graph and the draft graph.


rule export_llm:
    input:
        unpack(export_llm_inputs),
    output:
        onnx="onnx/{model}_{precision}/llm/model.onnx",
        data="onnx/{model}_{precision}/llm/onnx_model.data",
        config="onnx/{model}_{precision}/llm/config.json",
        embedding="onnx/{model}_{precision}/llm/embedding.safetensors",
        tokenizer="onnx/{model}_{precision}/llm/tokenizer.json",
        tokenizer_config="onnx/{model}_{precision}/llm/tokenizer_config.json",
        chat_template="onnx/{model}_{precision}/llm/processed_chat_template.json",
        manifest="onnx/{model}_{precision}/llm/manifest.json",
    log:
        "logs/export_llm/{model}_{precision}.log",
    benchmark:
        "benchmarks/export_llm/{model}_{precision}.tsv"
    conda:
        "../envs/export.yaml"
    params:
        code=step_code("export-llm"),
        command=step_command("export-llm"),
        checkpoint=export_checkpoint,
        options=export_options,
    shell:
        "{params.command} --model_dir {params.checkpoint:q} --output_dir $(dirname {output.onnx:q})"
        " {params.options} > {log:q} 2>&1"


rule export_visual:
    input:
        unpack(export_visual_inputs),
    output:
        onnx="onnx/{model}/visual/model.onnx",
        data="onnx/{model}/visual/onnx_model.data",
        config="onnx/{model}/visual/config.json",
        preprocessor="onnx/{model}/visual/preprocessor_config.json",
        manifest="onnx/{model}/visual/manifest.json",
    log:
        "logs/export_visual/{model}.log",
    benchmark:
        "benchmarks/export_visual/{model}.tsv"
    conda:
        "../envs/export.yaml"
    params:
        code=step_code("export-visual"),
        command=step_command("export-visual"),
        checkpoint=source_checkpoint,
        options=export_visual_options,
    shell:
        "{params.command} --model_dir {params.checkpoint:q} --output_dir $(dirname {output.onnx:q})"
        " {params.options} > {log:q} 2>&1"


rule export_eagle_base:
    input:
        unpack(eagle_base_inputs),
    output:
        onnx="onnx/{model}_{precision}/eagle_base/model.onnx",
        data="onnx/{model}_{precision}/eagle_base/onnx_model.data",
        config="onnx/{model}_{precision}/eagle_base/config.json",
        embedding="onnx/{model}_{precision}/eagle_base/embedding.safetensors",
        manifest="onnx/{model}_{precision}/eagle_base/manifest.json",
    log:
        "logs/export_eagle_base/{model}_{precision}.log",
    benchmark:
        "benchmarks/export_eagle_base/{model}_{precision}.tsv"
    conda:
        "../envs/export.yaml"
    params:
        code=step_code("export-llm"),
        command=step_command("export-llm"),
        checkpoint=export_checkpoint,
        options=export_options,
    shell:
        "{params.command} --model_dir {params.checkpoint:q} --output_dir $(dirname {output.onnx:q})"
        " --is_eagle_base {params.options} > {log:q} 2>&1"


rule export_draft:
    input:
        unpack(export_draft_inputs),
    output:
        onnx="onnx/{model}_{precision}/draft/model.onnx",
        data="onnx/{model}_{precision}/draft/onnx_model.data",
        config="onnx/{model}_{precision}/draft/config.json",
        d2t="onnx/{model}_{precision}/draft/d2t.safetensors",
        manifest="onnx/{model}_{precision}/draft/manifest.json",
    log:
        "logs/export_draft/{model}_{precision}.log",
    benchmark:
        "benchmarks/export_draft/{model}_{precision}.tsv"
    conda:
        "../envs/export.yaml"
    params:
        code=step_code("export-draft"),
        command=step_command("export-draft"),
        draft=draft_export_checkpoint,
        base=source_checkpoint,
    shell:
        "{params.command} --draft_model_dir {params.draft:q} --base_model_dir {params.base:q}"
        " --output_dir $(dirname {output.onnx:q}) > {log:q} 2>&1"


rule reduce_vocab:
    input:
        unpack(reduce_vocab_inputs),
    output:
        vocab_map="vocab/{model}/vocab_map.safetensors",
        manifest="vocab/{model}/manifest.json",
    log:
        "logs/reduce_vocab/{model}.log",
    conda:
        "../envs/export.yaml"
    params:
        code=step_code("reduce-vocab"),
        command=step_command("reduce-vocab"),
        checkpoint=source_checkpoint,
        options=reduce_vocab_options,
        draft=reduce_vocab_draft,
    shell:
        "{params.command} --model_dir {params.checkpoint:q} --output_dir $(dirname {output.vocab_map:q})"
        " {params.options} {params.draft} > {log:q} 2>&1"
