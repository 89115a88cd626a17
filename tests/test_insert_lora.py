"""insert-lora writes like every other step: claimed, staged, committed by the newest run only, its source checked.

``lora_model.onnx`` lives inside export-llm's directory, so a killed insert-lora's staging and its
claim file sit beside the export's files; an orphan of a killed workflow must never replace a
newer graph; and a graph made from another ``model.onnx`` is refused by every consumer. Kills and
orphans are real processes held at an exact point by their own claim lock (tests/commit_gate.py).
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest

from edgellm_steps.artifacts.atomic import staging_prefix
from edgellm_steps.artifacts.manifest import ManifestMismatchError, check_step_output
from edgellm_steps.engine.build_engine import check_export
from edgellm_steps.errors import EdgeLLMError
from edgellm_steps.export.export_llm import export_llm
from edgellm_steps.lora.insert_lora import check_lora_graph, insert_lora
from edgellm_steps.models.demo import make_lora_adapter
from edgellm_steps.verify.verify_onnx import verify_onnx

from .commit_gate import CommitGate, stopped
from .support import BIN, tool_env


def _insert_lora_process(onnx_dir: Path) -> subprocess.Popen:
    """edgellm-insert-lora as the workflow runs it: its own process, started (and so claiming) after the test's."""
    command = [str(BIN / "edgellm-insert-lora"), "--onnx_dir", str(onnx_dir)]
    return subprocess.Popen(command, env=tool_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _staged(out: Path) -> list[str]:
    """The staging of lora_model.onnx in the export ``out``: what a killed insert-lora leaves."""
    return sorted(p.name for p in out.iterdir() if p.name.startswith(staging_prefix(out / "lora_model.onnx")))


def test_an_insert_lora_killed_before_its_rename_leaves_the_export_usable(checkpoint_factory, tmp_path):
    """Killed with its graph staged inside the export, insert-lora leaves a file the export's manifest does not
    list. verify-onnx and build-engine still accept the export (that leftover, and the claim file, are
    insert-lora's own); any other unlisted file is still refused; the next insert-lora removes the leftover."""
    out = tmp_path / "llm"
    export_llm(checkpoint_factory("llama"), out)
    with CommitGate(out / "lora_model.onnx") as gate:
        writer = _insert_lora_process(out)
        os.kill(gate.hold(writer), signal.SIGKILL)
        writer.wait(timeout=60)
    assert len(_staged(out)) == 1 and not (out / "lora_model.onnx").exists()
    check_step_output(out, "export-llm")  # what verify-onnx checks
    check_export(out)  # what build-engine checks
    for stranger in (".notes", f"{staging_prefix(out / 'model.onnx')}x", "lora_model.onnx.bak"):
        (out / stranger).write_text("")
        with pytest.raises(ManifestMismatchError, match=f"holds {stranger}, which its manifest does not list"):
            check_step_output(out, "export-llm")
        (out / stranger).unlink()
    # The next run (a later process: the killed run's claim stands) removes the leftover.
    assert _insert_lora_process(out).wait(timeout=60) == 0
    graph = out / "lora_model.onnx"
    assert _staged(out) == [] and check_lora_graph(out) == graph
    mtime = graph.stat().st_mtime_ns
    assert _insert_lora_process(out).wait(timeout=60) == 0 and graph.stat().st_mtime_ns == mtime  # unchanged
    check_step_output(out, "export-llm")


@pytest.mark.parametrize("re_exported", [False, True], ids=["same-export", "re-exported"])
def test_an_orphan_insert_lora_never_replaces_a_newer_runs_graph(checkpoint_factory, tmp_path, re_exported):
    """An insert-lora of a killed workflow, held with its graph staged, commits after a later-started run.

    It must exit with the one-line verdict and leave the newer graph alone; also when the export was
    redone meanwhile (its model.onnx changed, the directory and the orphan's staging replaced whole).
    """
    out = tmp_path / "llm"
    destination = out / "lora_model.onnx"
    export_llm(checkpoint_factory("llama"), out)
    with CommitGate(destination) as gate:
        orphan = _insert_lora_process(out)
        held = stopped(gate.hold(orphan))
        try:
            gate.release()
            if re_exported:
                export_llm(checkpoint_factory("qwen2"), out)
            newer = _insert_lora_process(out)
            assert newer.wait(timeout=60) == 0, newer.communicate()[1]
            committed, stat = destination.read_bytes(), destination.stat()
        finally:
            held.resume()
        error = orphan.communicate(timeout=60)[1].strip().splitlines()[-1]
    assert orphan.returncode == 2, error
    assert error.startswith(f"error: {destination} now belongs to a run started later"), error
    assert destination.read_bytes() == committed
    assert (destination.stat().st_ino, destination.stat().st_mtime_ns) == (stat.st_ino, stat.st_mtime_ns)
    assert check_lora_graph(out) == destination and _staged(out) == []
    check_step_output(out, "export-llm")


def test_verify_with_an_adapter_refuses_a_lora_graph_of_another_model_onnx(checkpoint_factory, tmp_path):
    """A lora_model.onnx left from before model.onnx changed: verify-onnx refuses it in one line, as build-engine
    does, naming the insert-lora run that fixes it (it would otherwise run that graph on the new weights)."""
    out = tmp_path / "llm"
    export_llm(checkpoint_factory("llama"), out)
    stale = insert_lora(out).read_bytes()
    checkpoint = checkpoint_factory("qwen2")
    export_llm(checkpoint, out)
    (out / "lora_model.onnx").write_bytes(stale)
    adapter = tmp_path / "adapter"
    make_lora_adapter(adapter, checkpoint, ["q_proj", "v_proj", "down_proj"], r=4)
    with pytest.raises(EdgeLLMError, match=r"was made from another model\.onnx") as raised:
        verify_onnx(out, checkpoint, adapter=adapter, report=tmp_path / "verify.json")
    assert f"run edgellm-insert-lora --onnx_dir {out} again" in str(raised.value)
    assert "\n" not in str(raised.value) and not (tmp_path / "verify.json").exists()
    insert_lora(out)
    assert verify_onnx(out, checkpoint, adapter=adapter)["passed"]
