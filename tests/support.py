"""What test modules import: paths, tiny-checkpoint cases, the Snakemake driver, workflow scenarios.

conftest.py holds only fixtures and pytest hooks; a test module never imports it (pytest loads it
itself), so every importable helper lives here.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
#: Workflow configs of the tests, one YAML file per scenario (see :func:`scenario`).
SCENARIOS = Path(__file__).resolve().parent / "scenarios"

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}

#: One tiny configuration per test case of the export; every family in the registry must appear.
TINY_CASES = {
    "qwen2": {"family": "qwen2"},
    "llama-tied": {"family": "llama", "tie_word_embeddings": True},
    "llama-mqa": {"family": "llama", "num_key_value_heads": 1},
    "llama3-rope": {
        "family": "llama",
        "rope_parameters": LLAMA3_ROPE,
    },
    "qwen3": {"family": "qwen3"},
    # A config as transformers 4.x wrote it: rope_theta / rope_scaling instead of rope_parameters.
    "llama3-transformers4-config": {
        "family": "llama",
        "legacy_config": True,
        "rope_parameters": LLAMA3_ROPE,
    },
    "phi3-partial-rotary": {
        "family": "phi3",
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
    },
    # Saved in bfloat16, as most HF checkpoints are; the export converts to float16.
    "qwen2-bf16": {"family": "qwen2", "dtype": "bfloat16"},
    # Vision-language models: export-llm exports the language model (MRoPE decoder), text-only parity.
    "qwen2_vl": {"family": "qwen2_vl"},
    "qwen2_5_vl": {"family": "qwen2_5_vl"},
    # Qwen3-VL: interleaved MRoPE, q/k norms, deepstack inputs (zeros for text, as the runtime binds them).
    "qwen3_vl": {"family": "qwen3_vl"},
    # InternVL3: a Qwen2 decoder under the -hf layout's language_model.model.* names, its LM head tied.
    "internvl": {"family": "internvl"},
    # Phi-4-multimodal as transformers 5 loads it: the Phi-3 decoder beside a SigLIP tower and an audio encoder.
    "phi4mm": {"family": "phi4mm"},
}


def as_transformers4_config(path: Path) -> None:
    """Rewrite a transformers 5 config.json the way transformers 4.x spelled it."""
    config = json.loads(path.read_text())
    rope = config.pop("rope_parameters")
    config["rope_theta"] = rope.pop("rope_theta")
    if rope.get("rope_type", "default") != "default":
        rope["type"] = rope.pop("rope_type")
        config["rope_scaling"] = rope
    else:
        config["rope_scaling"] = None
    config["torch_dtype"] = config.pop("dtype")
    config["transformers_version"] = "4.51.3"
    path.write_text(json.dumps(config, indent=2))


def tool_env() -> dict[str, str]:
    """The environment for subprocesses: this venv's console scripts first on PATH."""
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def run_snakemake(
    workdir: Path, *args: str, check: bool = True, snakefile: Path | None = None, env: dict[str, str] | None = None
):
    """Run the real workflow in ``workdir``; returns the CompletedProcess (stdout+stderr merged)."""
    command = [
        str(BIN / "snakemake"),
        "--snakefile",
        str(snakefile or REPO / "Snakefile"),
        "--directory",
        str(workdir),
        "--cores",
        "2",
        *args,
    ]
    result = subprocess.run(command, env=env or tool_env(), capture_output=True, text=True)
    result.output = result.stdout + result.stderr
    if check and result.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed ({result.returncode}):\n{result.output[-4000:]}")
    return result


def plan_error(workdir: Path, target: str) -> str:
    """The one error line of a refused plan of ``target``: no traceback, no job run, nothing written."""
    result = run_snakemake(workdir, "-n", target, check=False)
    assert result.returncode != 0, result.output
    assert "Traceback" not in result.output and "Exception" not in result.output, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(errors) == 1, result.output
    assert not (workdir / "onnx").exists() and not (workdir / "logs").exists()
    return errors[0]


def write_config(workdir: Path, text: str) -> Path:
    """Write ``text`` as the work directory's config.yaml, the file the workflow reads when no --configfile is given."""
    path = workdir / "config.yaml"
    path.write_text(text)
    return path


def copy_checkpoint(source: Path, destination: Path) -> Path:
    """Copy a session checkpoint into a test's work directory, so the test may edit or move it freely."""
    shutil.copytree(source, destination)
    return destination


def flip_last_byte(path: Path) -> None:
    """Change one data byte of ``path`` (a weight, not a header): its content digest changes, its shapes do not."""
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))


def planned_jobs(output: str) -> dict[str, int]:
    """The job-count table of a dry run, e.g. {'export_llm': 1}."""
    jobs, in_table = {}, False
    for line in output.splitlines():
        parts = line.split()
        if parts[:2] == ["job", "count"]:
            in_table = True
        elif in_table and len(parts) == 2 and parts[1].isdigit() and parts[0] != "total":
            jobs[parts[0]] = int(parts[1])
        elif in_table and parts[:1] == ["total"]:
            break
    return jobs


_PLACEHOLDER = re.compile(r"\{(\w+)\}")


def scenario(name: str, **fields: str) -> str:
    """The text of ``tests/scenarios/<name>.yaml``, each ``{field}`` placeholder replaced by its value.

    Configs live in files so that a scenario reads as the YAML a user writes; placeholders are
    replaced literally (not with ``str.format``), so YAML flow mappings such as ``{source: draft}``
    stay as they are. A placeholder left unfilled, or a field the file does not name, is an error:
    either would silently test another config than the one meant.
    """
    text = (SCENARIOS / f"{name}.yaml").read_text()
    for field, value in fields.items():
        placeholder = "{" + field + "}"
        if placeholder not in text:
            raise KeyError(f"scenario {name!r} has no placeholder {placeholder}")
        text = text.replace(placeholder, value)
    missing = _PLACEHOLDER.findall(text)
    if missing:
        raise KeyError(f"scenario {name!r} needs a value for {', '.join(sorted(set(missing)))}")
    return text


#: The one-model workflow most workflow tests build.
ONNX = "onnx/tiny_fp16/llm/model.onnx"
MANIFEST = "onnx/tiny_fp16/llm/manifest.json"
NOTHING = "Nothing to be done"

CONFIG = scenario("one_model", model="tiny", source="ckpt")


@dataclass(frozen=True)
class WorkdirLayout:
    """What the ``workdir`` fixture lays out for a test module (its module-level ``WORKDIR``).

    A copy of the session checkpoint ``checkpoint`` (a :data:`TINY_CASES` case or a family) in
    ``ckpt/``, whatever ``extras(workdir, checkpoint)`` adds beside it (a draft, adapters), and
    ``config`` as config.yaml: each module states its work directory as data, one fixture builds it.
    """

    checkpoint: str = "qwen2"
    config: str = CONFIG
    extras: Callable[[Path, Path], object] | None = None


def lay_out_workdir(path: Path, layout: WorkdirLayout, checkpoint_factory: Callable[..., Path]) -> Path:
    """Fill ``path`` as ``layout`` says (checkpoint, extras, then config.yaml) and return it."""
    base = checkpoint_factory(layout.checkpoint)
    copy_checkpoint(base, path / "ckpt")
    if layout.extras is not None:
        layout.extras(path, base)
    write_config(path, layout.config)
    return path


#: How the trained-like copy rescales the tiny tower: learned positions to the patch embeddings' size,
#: and the blocks' output projections so each block moves the residual stream visibly.
TRAINED_LIKE = {"pos_embed.weight": 40.0, "attn.proj.weight": 10.0, "mlp.linear_fc2.weight": 10.0}


def rescaled_copy(checkpoint: Path, destination: Path, factors: dict[str, float] | None = None) -> Path:
    """A copy of ``checkpoint`` whose vision tensors are scaled by ``factors`` (tensor name suffix -> factor;
    default :data:`TRAINED_LIKE`), in the same file layout.

    A Qwen3-VL tower that looks trained: in the random one, learned positions and block updates barely matter.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    shutil.copytree(checkpoint, destination)
    shard = destination / "model.safetensors"
    with safe_open(str(shard), "pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(str(shard))
    for name, tensor in tensors.items():
        scale = TRAINED_LIKE if factors is None else factors
        factor = next((f for suffix, f in scale.items() if name.endswith(suffix) and "visual" in name), 1.0)
        tensors[name] = tensor * factor
    save_file(tensors, str(shard), metadata=metadata)
    return destination


def small_chunks(monkeypatch, elements: int) -> None:
    """Convert weights ``elements`` at a time instead of 16M, so that tiny models' weights stream in several chunks."""
    from edgellm_steps.export import quantized_linear, sidecars
    from edgellm_steps.graph import weight_streams

    for module in (weight_streams, quantized_linear, sidecars):
        monkeypatch.setattr(module, "CHUNK_ELEMENTS", elements)


def weights_hashed_as_written(patch) -> None:
    """Make a step's manifest fail if it reads a weights file again to hash it (``patch``: a MonkeyPatch).

    Steps that write weights hash them as they write them; the manifest must take that digest.
    """
    from edgellm_steps.artifacts import manifest

    read = manifest.file_digest

    def digest(path):
        if Path(path).suffix in (".safetensors", ".data"):
            raise AssertionError(f"{path} was read again to be hashed")
        return read(path)

    patch.setattr(manifest, "file_digest", digest)
