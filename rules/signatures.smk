# verify-signature: a source (or draft, or adapter) that declares a model-signing `signature` is checked
# against it before any step reads it; every job reading that source takes the stamp as an input.


rule verify_signature:
    input:
        unpack(ask(INPUTS.verify_signature, "model", "signed")),
    output:
        stamp=targets.SIGNATURE,
    log:
        "logs/verify_signature/{model}/{signed}.log",
    conda:
        "../envs/export.yaml"
    params:
        **step(steps.VERIFY_SIGNATURE),
        source=ask_unrecorded(INPUTS.signed_directory, "model", "signed"),
        options=ask_unrecorded(INPUTS.signature_options, "model", "signed"),
        method=ask(INPUTS.signature_method, "model", "signed"),
    shell:
        "{params.command} --source {params.source:q} --signature {input.signature:q} {params.options}"
        " --stamp {output.stamp:q} > {log:q} 2>&1"
