"""Every user-given path and string reaches its step as exactly one argument, whatever characters it holds.

Snakemake runs each rule's command through bash. A config value that reached a command unquoted
would split at a space, and a ``;`` or ``$()`` in it would run a command of its own. The test names
every user-given path in the config after a directory whose name holds spaces, both quotes, ``;``,
``$()``, backquotes and redirections, plans every rule, and runs each planned command in bash with the
step replaced by a program that prints the arguments it received: each value must arrive whole,
and nothing it holds may run. One real build then goes through the same paths.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from transformers import AutoTokenizer

from edgellm_steps.export.chat_template import process_chat_template
from edgellm_steps.models.demo import make_checkpoint, make_eagle3_draft, make_lora_adapter, write_block_fp8_checkpoint
from edgellm_steps.workflow.step_code import STEP_ENTRY_POINTS

from .support import WorkdirLayout, run_snakemake, write_config

pytestmark = pytest.mark.workflow

#: A directory name a shell would take apart in every way it can.
HOSTILE = 'it\'s a "dir"; $(touch PWNED-subst) `touch PWNED-tick` & echo PWNED > PWNED-redirect | cat'
PLUGIN = "libNvInfer_edgellm_plugin.so"


def _hostile_files(workdir: Path, base: Path) -> None:
    """Every user-given input under the hostile directory: source, draft, adapters, template, corpora, plugin."""
    root = workdir / HOSTILE
    root.mkdir()
    (workdir / "ckpt").rename(root / "ckpt")
    make_eagle3_draft(root / "draft", base)
    make_checkpoint(root / "vlm", family="qwen2_5_vl")
    write_block_fp8_checkpoint(base, root / "fp8")
    make_lora_adapter(root / "adapter one", base, ["q_proj", "v_proj"], r=4)
    template = process_chat_template(AutoTokenizer.from_pretrained(root / "ckpt"))
    (root / "template.json").write_text(json.dumps(template))
    (root / "calib.txt").write_text("The quick brown fox jumps over the lazy dog.\n" * 40)
    (root / "corpus.txt").write_text("hello world, the model speaks\n" * 40)
    (root / "heldout.txt").write_text("A held-out line the calibration never read.\n" * 40)
    (root / PLUGIN).write_bytes(b"")
    for name in ("vlm.sig", "signer.pub"):  # planning checks that they exist; no job here verifies one
        (root / name).write_text("{}")


def _config(workdir: Path) -> str:
    root = workdir / HOSTILE
    config = {
        "engine": {"plugin_path": str(root / PLUGIN)},
        "models": {
            "tiny": {
                "source": f"{HOSTILE}/ckpt",
                "precisions": ["fp16", "fp8"],
                "sm_targets": [110],
                "chat_template": f"{HOSTILE}/template.json",
                "draft": {"source": f"{HOSTILE}/draft", "precision": "fp8"},
                "reduced_vocab": {"size": 120, "corpus": f"{HOSTILE}/corpus.txt"},
                "quantization": {
                    "dataset": f"{HOSTILE}/calib.txt",
                    "calib_size": 4,
                    "calib_max_tokens": 32,
                    "threads": 1,
                },
            },
            "adapted": {
                "source": f"{HOSTILE}/ckpt",
                "sm_targets": [110],
                "build": {"max_lora_rank": 4},
                "lora": {"chat": f"{HOSTILE}/adapter one"},
                "accuracy": {"dataset": f"{HOSTILE}/heldout.txt"},
            },
            "vlm": {
                "source": f"{HOSTILE}/vlm",
                "sm_targets": [110],
                "signature": {"file": f"{HOSTILE}/vlm.sig", "public_key": f"{HOSTILE}/signer.pub"},
            },
            "merged": {"source": f"{HOSTILE}/ckpt", "lora": {"m": {"source": f"{HOSTILE}/adapter one", "merge": True}}},
            "released": {"source": f"{HOSTILE}/fp8"},
        },
    }
    return yaml.safe_dump(config, sort_keys=False)


WORKDIR = WorkdirLayout(checkpoint="llama", config="models: {}\n", extras=_hostile_files)

#: Targets that plan every rule: engines (EAGLE pair, quantized, LoRA, VLM), verify and accuracy reports, a merged
#: variant, a block-FP8 release's export.
TARGETS = (
    "engines/tiny_fp16.engine",
    "engines/tiny_fp8.engine",
    "reports/tiny_fp16/verify.json",
    "engines/adapted_fp16.engine",
    "engines/vlm_fp16.engine",
    "reports/vlm/visual/verify.json",
    "reports/adapted_fp16/lora/chat/verify.json",
    "reports/adapted/accuracy.json",
    "reports/adapted/jobs.json",
    "onnx/merged+m_fp16/llm/model.onnx",
    "onnx/released_fp16/llm/model.onnx",
)
#: What lies under the hostile directory, and every flag that passes one of them on.
HOSTILE_FILES = (
    "ckpt",
    "vlm",
    "fp8",
    "draft",
    "adapter one",
    "template.json",
    "calib.txt",
    "corpus.txt",
    "heldout.txt",
    PLUGIN,
    "vlm.sig",
    "signer.pub",
)
HOSTILE_FLAGS = {
    "--model_dir",
    "--base_model_dir",
    "--draft_model_dir",
    "--chat_template",
    "--dataset_dir",
    "--corpus",
    "--dataset",
    "--plugin_path",
    "--adapter_dir",
    "--input_dir",
    "--adapter",
    "--source",
    "--signature",
    "--public_key",
}
#: How the rules run a step: the interpreter that runs Snakemake.
STEP_PYTHON = shlex.quote(sys.executable)
#: Prints the arguments it was given as one JSON list, in place of a step.
ARGV_PRINTER = f"{shlex.quote(sys.executable)} -c 'import json, sys; print(json.dumps(sys.argv[1:]))'"


def _planned_commands(output: str) -> list[str]:
    """The shell commands of a ``--dry-run --printshellcmds`` plan, one line each."""
    marker = "Shell command: "
    return [line.split(marker, 1)[1].strip() for line in output.splitlines() if line.startswith(marker)]


def _received(command: str, scratch: Path) -> list[str]:
    """Run ``command`` as Snakemake would, the step swapped for the argument printer; what the step received."""
    step = re.search(re.escape(STEP_PYTHON) + r" -m edgellm_steps\.cli\.\w+", command)
    log = re.search(r"> (\S+) 2>&1$", command)
    assert step and log, command
    log_path = scratch / shlex.split(log.group(1))[0]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["bash", "-c", command.replace(step.group(0), ARGV_PRINTER)], cwd=scratch, check=True)
    return json.loads(log_path.read_text())


def test_every_user_string_reaches_its_step_as_one_argument(workdir, tmp_path_factory):
    write_config(workdir, _config(workdir))
    plan = run_snakemake(workdir, "--dry-run", "--printshellcmds", *TARGETS)
    commands = _planned_commands(plan.output)
    step_modules = {m.rsplit(".", 1)[-1] for m in STEP_ENTRY_POINTS.values()}
    planned_steps = {re.search(r"-m edgellm_steps\.cli\.(\w+)", c).group(1) for c in commands if "-m " in c}
    assert planned_steps == step_modules - {"make_demo"}, "every step's rule is planned"
    hostile_paths = {f"{HOSTILE}/{name}" for name in HOSTILE_FILES}
    hostile_paths |= {str(workdir.resolve() / path) for path in hostile_paths}
    scratch = tmp_path_factory.mktemp("scratch")
    seen = set()
    for command in commands:
        if command.startswith("ln -sfn"):
            continue
        argv = _received(command, scratch)
        for flag, value in itertools.pairwise(argv):
            if "PWNED" in value:
                assert value in hostile_paths, f"{flag} received {value!r}"
                seen.add(flag)
        assert sum("PWNED" in a for a in argv) == sum(a in hostile_paths for a in argv), argv
    assert seen == HOSTILE_FLAGS, f"flags never planned: {HOSTILE_FLAGS - seen}"
    assert not list(scratch.rglob("PWNED*")) and not list(workdir.rglob("PWNED*"))


def test_a_real_build_takes_the_hostile_paths(workdir):
    write_config(workdir, _config(workdir))
    run_snakemake(
        workdir,
        "onnx/tiny_fp16/llm/model.onnx",
        "lora/adapted/chat/processed_adapter_model.safetensors",
    )
    template = json.loads((workdir / "onnx/tiny_fp16/llm/processed_chat_template.json").read_text())
    assert template == json.loads((workdir / HOSTILE / "template.json").read_text())
    assert not list(workdir.rglob("PWNED*"))


def test_the_check_sees_an_unquoted_value(tmp_path):
    """Negative control: the value unquoted runs its commands.

    Less its lone quote (bash would stop there) and with ``&`` as ``;``: a background job could
    run after the check.
    """
    value = HOSTILE.replace("'", "").replace("&", ";") + "/template.json"
    command = f"{STEP_PYTHON} -m edgellm_steps.cli.export_llm --chat_template {value} > logs/x.log 2>&1"
    with contextlib.suppress(subprocess.CalledProcessError, json.JSONDecodeError, FileNotFoundError):
        assert value not in _received(command, tmp_path)
    assert (tmp_path / "PWNED-subst").exists() and (tmp_path / "PWNED-tick").exists()
