"""Quantized, verified and pre-quantized (GPTQ) targets through real Snakemake runs."""

from __future__ import annotations

import json

import pytest

from .support import (
    CONFIG,
    NOTHING,
    ONNX,
    copy_checkpoint,
    planned_jobs,
    run_snakemake,
    scenario,
    write_config,
)

pytestmark = pytest.mark.workflow


def test_verify_target_writes_a_passing_report(tmp_path, checkpoint_factory):
    copy_checkpoint(checkpoint_factory("qwen2"), tmp_path / "ckpt")
    write_config(tmp_path, CONFIG)
    plan = run_snakemake(tmp_path, "-n", "reports/tiny_fp16/verify.json")
    assert planned_jobs(plan.output) == {"export_llm": 1, "verify_onnx": 1}
    run_snakemake(tmp_path, "reports/tiny_fp16/verify.json")
    report = json.loads((tmp_path / "reports/tiny_fp16/verify.json").read_text())
    assert report["passed"] and report["cases"]["prefill_decode"]["greedy_match"]
    assert NOTHING in run_snakemake(tmp_path, "-n", "reports/tiny_fp16/verify.json").output
    # Snakemake's own report holds the verify report.
    run_snakemake(tmp_path, "reports/tiny_fp16/verify.json", "--report", "report.html")
    html = (tmp_path / "report.html").read_text()
    assert "Verify" in html and "verify.json" in html


QUANT_CONFIG = scenario("quantized")
ACCURACY = "reports/tiny/accuracy.json"
#: The precisions the accuracy report is built for through Snakemake: two built already, one of them from the shared
#: statistics (each format's figures are checked against ModelOpt in test_quantize; the demo builds fp8's).
ACCURACY_PRECISIONS = ("int4_awq", "int8_sq-lmnvfp4-kvfp8")
JOBS = "reports/tiny/jobs.json"
#: Built: weights alone (AWQ, its own calibration) and weights with an lm_head and a KV cache (from the shared
#: statistics); a KV cache over fp16 weights is planned below. fp8 weights go through the workflow in the demo and
#: the block-FP8 test; each format's quantize and export is proven against ModelOpt in test_quantize.
QUANT_PRECISIONS = (
    "int4_awq",
    "int8_sq-lmnvfp4-kvfp8",
)


def test_every_quantized_precision_builds_and_calibration_config_is_tracked(tmp_path, checkpoint_factory):
    """One shared calibration pass serves every precision but AWQ's; adding a precision reuses it, a changed
    calibration setting reruns it and every precision made from it, where calibration runs reruns nothing."""
    copy_checkpoint(checkpoint_factory("qwen2", hidden_size=128, intermediate_size=256), tmp_path / "ckpt")
    write_config(tmp_path, QUANT_CONFIG)
    targets = [f"onnx/tiny_{p}/llm/model.onnx" for p in (*QUANT_PRECISIONS, "fp16")]
    plan = run_snakemake(tmp_path, "-n", *targets)
    jobs = {"calibrate_llm": 1, "quantize_llm": len(QUANT_PRECISIONS), "export_llm": len(targets)}
    assert planned_jobs(plan.output) == jobs
    run_snakemake(tmp_path, *targets)
    for precision in QUANT_PRECISIONS:
        info = json.loads((tmp_path / f"quantized/tiny_{precision}/edgellm_quantization.json").read_text())
        assert info["precision"] == precision and info["calibration"]["samples"] == 4
        assert (info["calibration"].get("statistics") == "shared") == (precision != "int4_awq"), precision
    assert NOTHING in run_snakemake(tmp_path, "-n", *targets).output

    # The accuracy report of configured precisions already built: one job over their exports, its page and plot in
    # Snakemake's own report; a changed accuracy setting reruns it alone.
    configured = QUANT_CONFIG + f"    precisions: [{', '.join(ACCURACY_PRECISIONS)}]\n"
    write_config(tmp_path, configured)
    planned = {"accuracy_report": 1, "job_costs": 1}
    assert planned_jobs(run_snakemake(tmp_path, "-n", ACCURACY, JOBS).output) == planned
    run_snakemake(tmp_path, ACCURACY, JOBS)
    run_snakemake(tmp_path, ACCURACY, JOBS, "--report", "report.html")
    report = json.loads((tmp_path / ACCURACY).read_text())
    assert list(report["precisions"]) == ["fp16", *sorted(ACCURACY_PRECISIONS)] and report["inputs"]["samples"] == 8
    assert report["precisions"]["fp16"]["top1_agreement"] == 1
    assert all(0 < figures["perplexity"] < 1000 for figures in report["precisions"].values())
    html = (tmp_path / "report.html").read_text()
    assert "accuracy.png" in html and "accuracy.html" in html and "jobs.html" in html
    # The jobs table: every job of the chain, each figure Snakemake's own benchmark row.
    costs = json.loads((tmp_path / JOBS).read_text())
    names = [job["job"] for job in costs["jobs"]]
    assert names[0] == "calibrate-llm" and names[-1] == "accuracy-report" and len(names) == 1 + 2 + 3 + 1
    for job in costs["jobs"]:
        header, row = (tmp_path / job["benchmark"]).read_text().splitlines()[:2]
        measured = dict(zip(header.split("\t"), row.split("\t"), strict=True))
        assert job["wall_s"] == float(measured["s"]) and job["max_rss_mib"] == float(measured["max_rss"]), job
    assert costs["not_measured"] == [] and costs["max_rss_mib"] > 100
    # A deleted benchmark file reruns no job: the table says it was not measured.
    (tmp_path / "benchmarks/quantize_llm/tiny_int4_awq.tsv").unlink()
    assert NOTHING in run_snakemake(tmp_path, "-n", ACCURACY, JOBS).output
    run_snakemake(tmp_path, JOBS, "--forcerun", "job_costs")
    assert json.loads((tmp_path / JOBS).read_text())["not_measured"] == ["quantize-llm int4_awq"]
    write_config(tmp_path, configured + "    accuracy: {samples: 4}\n")
    assert planned_jobs(run_snakemake(tmp_path, "-n", ACCURACY, *targets).output) == {"accuracy_report": 1}
    # Layers kept in fp16: every quantize job reruns (and what reads it), the shared statistics do not.
    write_config(tmp_path, QUANT_CONFIG + '      exclude: ["model.layers.0.self_attn.*"]\n')
    replan = run_snakemake(tmp_path, "-n", *targets)
    stale = len(QUANT_PRECISIONS)
    assert planned_jobs(replan.output) == {"quantize_llm": stale, "export_llm": stale}
    assert "--exclude 'model.layers.0.self_attn.*'" in replan.output
    write_config(tmp_path, QUANT_CONFIG)

    # Another precision of the model (a KV cache over fp16 weights): its own quantize job, from the statistics
    # already there.
    added = run_snakemake(tmp_path, "-n", *targets, "onnx/tiny_fp16-kvfp8/llm/model.onnx")
    assert planned_jobs(added.output) == {"quantize_llm": 1, "export_llm": 1}
    assert "quantized/tiny_fp16-kvfp8" in added.output

    write_config(tmp_path, QUANT_CONFIG.replace("calib_size: 4", "calib_size: 6") + "      device: cpu\n")
    replan = run_snakemake(tmp_path, "-n", *targets)
    assert planned_jobs(replan.output) == {"calibrate_llm": 1, "quantize_llm": stale, "export_llm": stale}
    assert "--calib_size 6" in replan.output
    # Where and how calibration runs changes nothing built.
    write_config(tmp_path, QUANT_CONFIG.replace("threads: 1", "threads: 2") + "      device: cuda\n")
    assert NOTHING in run_snakemake(tmp_path, "-n", *targets).output


def test_gptq_checkpoint_exports_without_a_quantize_job(tmp_path, checkpoint_factory):
    from .gptq_checkpoint import write_gptq_checkpoint

    write_gptq_checkpoint(
        checkpoint_factory("qwen2", hidden_size=128, intermediate_size=256), tmp_path / "ckpt", tmp_path / "float"
    )
    write_config(tmp_path, CONFIG)
    target = "onnx/tiny_int4_gptq/llm/model.onnx"
    report = "reports/tiny_int4_gptq/verify.json"
    assert planned_jobs(run_snakemake(tmp_path, "-n", target).output) == {"export_llm": 1}
    run_snakemake(tmp_path, target, report)
    # verify's reference is the float model holding the dequantized GPTQ weights: no GPTQ kernel package.
    summary = json.loads((tmp_path / report).read_text())
    assert summary["passed"] and summary["precision"] == "int4_gptq"
    assert all(case["greedy_match"] for case in summary["cases"].values())
    # Its Linears are quantized already: layers to keep in fp16 are refused, not ignored.
    write_config(tmp_path, CONFIG + '    quantization: {exclude: ["*.down_proj"]}\n')
    refused = run_snakemake(tmp_path, "-n", target, check=False)
    assert refused.returncode != 0 and "Traceback" not in refused.output
    assert "already quantized as int4_gptq, so quantization.exclude cannot keep its Linears" in refused.output
    assert json.loads((tmp_path / "onnx/tiny_int4_gptq/llm/manifest.json").read_text())["parameters"]["precision"] == (
        "int4_gptq"
    )
    refused = run_snakemake(tmp_path, "-n", ONNX, check=False)
    assert refused.returncode != 0 and "request precision int4_gptq" in refused.output
