"""The workflow on a real (single-node, loopback) Slurm cluster through profiles/slurm."""

from __future__ import annotations

import pytest

from .slurm_cluster import FEATURE, ClusterUnavailable, local_slurm
from .support import CONFIG, REPO, WorkdirLayout, lay_out_workdir, run_snakemake

pytestmark = pytest.mark.workflow

#: Fast polling for a loopback cluster; the profile keeps cluster-friendly defaults.
FAST = (
    "--slurm-init-seconds-before-status-checks",
    "1",
    "--seconds-between-status-checks",
    "1",
    "--slurm-keep-successful-logs",
    "--slurm-no-account",
)


@pytest.fixture(scope="module")
def cluster():
    try:
        with local_slurm() as host:
            yield host
    except ClusterUnavailable as reason:
        pytest.skip(str(reason))


#: The workdir fixture's layout: a qwen2 checkpoint and the one-model config.
WORKDIR = WorkdirLayout(checkpoint="qwen2", config=CONFIG)


@pytest.fixture(scope="module")
def workdir(cluster, tmp_path_factory, checkpoint_factory):
    """One work directory for the module: the export its engine jobs need is submitted to Slurm once, by
    whichever test asks first (in file order, the first one, which checks it)."""
    return lay_out_workdir(tmp_path_factory.mktemp("slurm"), WORKDIR, checkpoint_factory)


def slurm(workdir, *args, check=True):
    return run_snakemake(workdir, "--profile", str(REPO / "profiles/slurm"), *FAST, *args, check=check)


def test_cpu_stages_run_as_slurm_jobs(cluster, workdir):
    result = slurm(workdir, "onnx/tiny_fp16/llm/model.onnx")
    assert "has been submitted with SLURM jobid" in result.output
    assert (workdir / "onnx/tiny_fp16/llm/manifest.json").is_file()
    logs = list((workdir / ".snakemake/slurm_logs/rule_export_llm").rglob("*.log"))
    assert logs, "no Slurm job log for export_llm"
    assert "Nothing to be done" in run_snakemake(workdir, "-n", "onnx/tiny_fp16/llm/model.onnx").output


def test_engine_jobs_get_a_gpu_and_their_sm_constraint(cluster, workdir):
    plan = run_snakemake(workdir, "-n", "engines/sm87/tiny_fp16.engine")
    assert "gpu=1" in plan.output and "constraint=sm87" in plan.output
    result = slurm(workdir, "engines/sm87/tiny_fp16.engine", check=False)
    assert result.returncode != 0  # no TensorRT on this host: the build fails in its one line
    log = (workdir / "logs/build_engine/sm87/tiny_fp16.log").read_text()
    assert "SLURM_GPUS_ON_NODE=1" in log, log  # Slurm allocated the (fake) GPU to the job
    assert log.strip().splitlines()[-1].startswith("error: TensorRT is not installed")
    assert not (workdir / "engines/sm87/tiny_fp16.engine").exists()


def test_a_target_no_node_can_run_is_refused(cluster, workdir):
    """The sm110 job asks for constraint sm110, which no node has (FEATURE): sbatch itself refuses it."""
    assert "sm110" not in FEATURE.split(",")
    result = slurm(workdir, "engines/sm110/tiny_fp16.engine", check=False)
    assert result.returncode != 0
    # The executor quotes sbatch's own refusal and the call that got it.
    refusal = "SLURM sbatch failed. The error message was 'sbatch: error: Batch job submission failed: "
    assert refusal + "Invalid feature specification'" in result.output, result.output[-4000:]
    assert "-C sm110" in result.output
    # Refused at submission: at most the export job (if no test before built it) got a job id; the engine
    # job never ran, so it has no Slurm job log and its step wrote nothing (Snakemake may leave the log empty).
    assert result.output.count("has been submitted with SLURM jobid") <= 1
    assert not list((workdir / ".snakemake/slurm_logs/rule_build_engine").glob("110_*/*.log"))
    build_log = workdir / "logs/build_engine/sm110/tiny_fp16.log"
    assert not build_log.exists() or build_log.read_text() == ""
    assert not (workdir / "engines/sm110/tiny_fp16.engine").exists()
