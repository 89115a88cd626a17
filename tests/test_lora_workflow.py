"""A model with LoRA adapters through the real workflow: insert_lora, process_lora, the engine plan, refusals."""

from __future__ import annotations

import json
import os
import subprocess
import time

import pytest

from edgellm_steps.artifacts.atomic import staging_prefix
from edgellm_steps.artifacts.manifest import check_step_output
from edgellm_steps.lora.insert_lora import check_lora_graph
from edgellm_steps.models.demo import make_lora_adapter

from .commit_gate import CommitGate, stopped
from .support import (
    BIN,
    NOTHING,
    REPO,
    WorkdirLayout,
    copy_checkpoint,
    flip_last_byte,
    planned_jobs,
    run_snakemake,
    scenario,
    tool_env,
    write_config,
)

pytestmark = pytest.mark.workflow

CONFIG = scenario("lora")
TARGETS = (
    "onnx/tiny_fp16/llm/lora_model.onnx",
    "lora/tiny/chat/processed_adapter_model.safetensors",
    "lora/tiny/code/processed_adapter_model.safetensors",
)


def _adapters(workdir, base) -> None:
    """The config's two adapters: chat (rank 4, attention) and code (rank 8, o_proj and down_proj)."""
    make_lora_adapter(workdir / "adapters/chat", base, ["q_proj", "v_proj"], r=4)
    make_lora_adapter(workdir / "adapters/code", base, ["o_proj", "down_proj"], seed=1, r=8)


#: The workdir fixture's layout: a llama checkpoint and two adapters trained for it.
WORKDIR = WorkdirLayout(checkpoint="llama", config=CONFIG, extras=_adapters)


def test_adapters_are_processed_once_per_model_and_linked_by_the_engine(workdir):
    assert planned_jobs(run_snakemake(workdir, "-n", *TARGETS).output) == {
        "export_llm": 1,
        "insert_lora": 1,
        "process_lora": 2,
    }
    run_snakemake(workdir, *TARGETS)
    run_snakemake(workdir, "reports/tiny_fp16/lora/chat/verify.json")
    report = json.loads((workdir / "reports/tiny_fp16/lora/chat/verify.json").read_text())
    assert report["passed"] and report["adapter"].endswith("adapters/chat")
    config = json.loads((workdir / "lora/tiny/code/config.json").read_text())
    assert config["r"] == 8 and config["target_modules"] == ["down_proj", "o_proj"]
    assert NOTHING in run_snakemake(workdir, "-n", *TARGETS).output
    # The accuracy report measures each served adapter too, from the graph and the processed adapters built.
    accuracy = run_snakemake(workdir, "-n", "--printshellcmds", "reports/tiny/accuracy.json").output
    assert planned_jobs(accuracy) == {"accuracy_report": 1}
    assert "--adapter chat=lora/tiny/chat --adapter code=lora/tiny/code" in accuracy
    # Its jobs table lists the LoRA jobs behind it too.
    costs = run_snakemake(workdir, "-n", "--printshellcmds", "reports/tiny/jobs.json").output
    assert planned_jobs(costs) == {"accuracy_report": 1, "job_costs": 1}
    assert "--benchmark 'insert-lora fp16=benchmarks/insert_lora/tiny_fp16.tsv'" in costs
    assert "--benchmark 'process-lora code=benchmarks/process_lora/tiny/code.tsv'" in costs
    plan = run_snakemake(workdir, "-n", "--printshellcmds", "engines/sm110/tiny_fp16.engine")
    job = next(j for j in plan.output.split("rule ") if j.startswith("build_engine:"))
    assert "--lora_adapter chat=lora/tiny/chat" in job and "--lora_adapter code=lora/tiny/code" in job
    assert "--max_lora_rank 8" in job
    # Stand in for a built engine (no TensorRT here), newer than everything it was built from.
    engine = workdir / "engines/sm110/tiny_fp16.engine"
    engine.mkdir(parents=True)
    (engine / "llm.engine").write_bytes(b"engine")
    later = time.time() + 5
    os.utime(engine, (later, later))
    assert NOTHING in run_snakemake(workdir, "-n", "engines/sm110/tiny_fp16.engine").output
    # Editing one adapter reprocesses that adapter only: no graph, no engine.
    make_lora_adapter(workdir / "adapters/chat", workdir / "ckpt", ["q_proj", "v_proj"], seed=5, r=4)
    replan = run_snakemake(workdir, "-n", *TARGETS, "engines/sm110/tiny_fp16.engine")
    assert planned_jobs(replan.output) == {"process_lora": 1}
    assert "adapter=chat" in replan.output and "adapter=code" not in replan.output
    # A changed base weight reruns the export and its LoRA graph, no other adapter: process-lora reads config.json.
    flip_last_byte(workdir / "ckpt/model.safetensors")
    replan = run_snakemake(workdir, "-n", *TARGETS)
    assert planned_jobs(replan.output) == {"export_llm": 1, "insert_lora": 1, "process_lora": 1}
    assert "adapter=chat" in replan.output and "adapter=code" not in replan.output


def test_an_orphan_insert_lora_of_a_killed_workflow_never_replaces_the_rerun_graph(workdir):
    """README's recovery after Snakemake is killed (unlock, rerun), its insert-lora step living on as an orphan.

    The orphan is held at its commit, its graph staged inside the export directory, until the rerun has
    made the graph again (removing that staging as a leftover); released, it must leave the rerun's
    graph alone, and the plan and the export's consumers must agree with what is on disk.
    """
    graph = workdir / TARGETS[0]
    run_snakemake(workdir, TARGETS[0])
    with CommitGate(graph) as gate:
        command = [str(BIN / "snakemake"), "--directory", str(workdir), "--snakefile", str(REPO / "Snakefile")]
        killed = subprocess.Popen(
            [*command, "-c1", "--forcerun", "insert_lora", TARGETS[0]],
            env=tool_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        orphan = stopped(gate.hold(killed))
        try:
            killed.kill()  # Snakemake only: its insert-lora step runs on
            killed.wait(timeout=60)
            gate.release()
            run_snakemake(workdir, "--unlock")
            run_snakemake(workdir, TARGETS[0])
            rerun, stat = graph.read_bytes(), graph.stat()
            assert not list(graph.parent.glob(f"{staging_prefix(graph)}*")), "the rerun kept the orphan's staging"
            # The rerun replaced the step's log; the orphan still writes to the one it was started with.
            orphan_log = open(f"/proc/{orphan.pid}/fd/2", "rb")  # noqa: SIM115 (closed below)
        finally:
            orphan.resume()
        orphan.wait(timeout=60)
    with orphan_log:
        verdict = orphan_log.read().decode(errors="replace").strip().splitlines()[-1]
    assert verdict.startswith("error: onnx/tiny_fp16/llm/lora_model.onnx now belongs to a run started later"), verdict
    after = graph.stat()
    assert graph.read_bytes() == rerun and (after.st_ino, after.st_mtime_ns) == (stat.st_ino, stat.st_mtime_ns)
    assert NOTHING in run_snakemake(workdir, "-n", TARGETS[0]).output
    check_step_output(graph.parent, "export-llm")
    assert check_lora_graph(graph.parent) == graph


def test_an_adapter_the_model_cannot_serve_fails_at_planning(workdir, checkpoint_factory):
    write_config(workdir, CONFIG.replace("max_lora_rank: 8", "max_lora_rank: 4"))
    refused = run_snakemake(workdir, "-n", "engines/sm110/tiny_fp16.engine", check=False)
    assert refused.returncode != 0
    assert "model 'tiny' adapter 'code' (adapters/code): its rank is 8 but build.max_lora_rank is 4" in refused.output
    # An adapter trained for another model (other widths) is refused before anything runs.
    other = checkpoint_factory("qwen2", hidden_size=128, intermediate_size=256)
    make_lora_adapter(workdir / "adapters/code", other, ["o_proj"], r=8)
    write_config(workdir, CONFIG)
    refused = run_snakemake(workdir, "-n", TARGETS[2], check=False)
    assert refused.returncode != 0
    assert "adapts model.layers.0.self_attn.o_proj as 128 -> 128, but the model's is 64 -> 64" in refused.output
    assert not (workdir / "lora").exists()


def test_lora_targets_need_adapters(tmp_path, checkpoint_factory):
    copy_checkpoint(checkpoint_factory("llama"), tmp_path / "ckpt")
    write_config(tmp_path, scenario("one_model", model="tiny", source="ckpt"))
    refused = run_snakemake(tmp_path, "-n", TARGETS[0], check=False)
    assert refused.returncode != 0 and "model 'tiny' has no LoRA adapters" in refused.output
    refused = run_snakemake(tmp_path, "-n", TARGETS[1], check=False)
    assert refused.returncode != 0 and "model 'tiny' has no LoRA adapter 'chat'; add lora:" in refused.output


MERGED_CONFIG = scenario("lora_merged")


def test_a_merged_adapter_is_a_model_variant(workdir):
    import numpy as np
    import peft
    import transformers

    from edgellm_steps.verify.parity import TOLERANCES, compare_logits, hf_rope_table
    from edgellm_steps.verify.reference import LLMRunner

    write_config(workdir, MERGED_CONFIG)
    plan = run_snakemake(workdir, "-n", "engines/sm110/tiny+chat_fp8.engine")
    assert planned_jobs(plan.output) == {
        "merge_lora": 1,
        "calibrate_llm": 1,
        "quantize_llm": 1,
        "export_llm": 1,
        "build_engine": 1,
    }
    everything = run_snakemake(workdir, "-n").output
    assert "engines/sm110/tiny+chat_fp16.engine" in everything and "engines/sm110/tiny_fp8.engine" in everything
    run_snakemake(workdir, "onnx/tiny+chat_fp16/llm/model.onnx", "onnx/tiny_fp16/llm/model.onnx")
    base = transformers.AutoModelForCausalLM.from_pretrained(str(workdir / "ckpt"))
    merged = peft.PeftModel.from_pretrained(base, str(workdir / "adapters/chat")).merge_and_unload().eval()
    ids = np.random.default_rng(0).integers(0, 300, (1, 10)).tolist()
    runner = LLMRunner(workdir / "onnx/tiny+chat_fp16/llm", hf_rope_table(merged, 16), batch=1, capacity=16)
    import torch

    with torch.no_grad():
        expected = merged(torch.tensor(ids)).logits.numpy()
    assert compare_logits(runner.step(ids, all_logits=True), expected).passed(TOLERANCES["fp16"])
    # Editing the adapter remerges and re-exports the variant; the model itself is untouched.
    make_lora_adapter(workdir / "adapters/chat", workdir / "ckpt", ["q_proj", "v_proj"], seed=5, r=4)
    replan = run_snakemake(workdir, "-n", "onnx/tiny+chat_fp16/llm/model.onnx", "onnx/tiny_fp16/llm/model.onnx")
    assert planned_jobs(replan.output) == {"merge_lora": 1, "export_llm": 1}
    assert "model=tiny+chat" in replan.output
    refused = run_snakemake(workdir, "-n", "onnx/tiny+code_fp16/llm/model.onnx", check=False)
    assert refused.returncode != 0 and "'tiny+code' is no merged variant" in refused.output
