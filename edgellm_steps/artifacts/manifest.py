"""Stage manifests: what a step produced, by content.

Each step ends by writing ``manifest.json`` beside its artifacts: every file it
wrote with its size and xxh3-128 digest, plus the step's parameters. Consumers
depend on the manifest, not on the bulky files' timestamps, and before reading a
directory they check that its files are exactly the ones the manifest lists.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from edgellm_steps.artifacts.atomic import staging_prefix
from edgellm_steps.artifacts.claims import claim_path
from edgellm_steps.artifacts.digests import file_digest, written_digest
from edgellm_steps.errors import EdgeLLMError

MANIFEST_NAME = "manifest.json"
#: Files a later step writes into an earlier step's directory, by contract: insert-lora's
#: ``lora_model.onnx`` beside export-llm's ``model.onnx``. A manifest neither lists nor forbids them,
#: nor their claim files and staging (:func:`is_later_step_file`).
LATER_STEP_FILES = frozenset({"lora_model.onnx"})


class ManifestMismatchError(EdgeLLMError):
    """A step's output directory no longer holds what its manifest lists."""


def write_manifest(directory: Path, *, step: str, parameters: dict[str, Any]) -> Path:
    """Digest every file in ``directory`` and write the manifest there.

    A file whose digest was computed as it was written (:mod:`edgellm_steps.artifacts.streamed_file`)
    is not read again.
    """
    directory = Path(directory)
    files = {name: _file_entry(directory / name) for name in _file_names(directory)}
    manifest = {"step": step, "parameters": parameters, "files": files}
    path = directory / MANIFEST_NAME
    path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return path


def _file_entry(path: Path) -> dict[str, Any]:
    """A file by size and digest; a symbolic link by its target (an engine directory links its LoRA adapters)."""
    if path.is_symlink():
        return {"symlink": os.readlink(path)}
    return {"bytes": path.stat().st_size, "xxh3_128": written_digest(path) or file_digest(path)}


def _file_names(directory: Path) -> list[str]:
    """Every file under ``directory`` but the manifest itself and later steps' files, as sorted relative POSIX paths.

    Subdirectories count (an engine directory holds its vision engine in ``visual/``).
    """
    names = (p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file() or p.is_symlink())
    return sorted(name for name in names if name != MANIFEST_NAME and not is_later_step_file(name))


def is_later_step_file(name: str) -> bool:
    """Whether ``name`` (relative to a step's directory) is a later step's file, its claim file or its staging.

    The later step claims and stages its file beside it (:func:`edgellm_steps.artifacts.atomic.claim_file`),
    so a run of it killed midway leaves staging that its next run removes; until then the directory
    must still pass :func:`check_step_output`. Exactly those names: any other extra file is refused.
    """
    if "/" in name:
        return False
    return any(
        name in (later, claim_path(Path(later)).name) or name.startswith(staging_prefix(Path(later)))
        for later in LATER_STEP_FILES
    )


def check_step_output(directory: Path, step: str, *, contents: bool = True) -> dict[str, Any]:
    """Return ``directory``'s manifest after proving the directory is exactly what ``step`` wrote.

    Every listed file must be there with its size and digest, and no other file may be:
    a consumer never reads a file that was edited, truncated or added after the step
    finished. Raises :class:`ManifestMismatchError` naming the first difference.
    ``contents=False`` checks the names and sizes only, reading no file: the quick half, for a consumer
    that hashes the contents while it reads them and commits nothing before that half passes too.
    """
    directory = Path(directory)
    manifest = _step_manifest(directory, step)
    listed: dict[str, dict] = manifest["files"]
    if extra := sorted(set(_file_names(directory)) - set(listed)):
        raise ManifestMismatchError(
            f"{directory} holds {extra[0]}, which its manifest does not list; {_rerun_hint(step)}"
        )
    for name in sorted(listed):
        _check_file(directory, manifest, step, name, contents=contents)
    return manifest


def check_listed_file(directory: Path, step: str, name: str) -> dict[str, Any]:
    """Prove one file of ``step``'s output ``directory`` is what the step wrote, reading that file only.

    For a consumer that must not read the rest (insert-lora reads ``model.onnx``, never the
    weights beside it); returns the manifest.
    """
    manifest = _step_manifest(Path(directory), step)
    _check_file(Path(directory), manifest, step, name)
    return manifest


def _step_manifest(directory: Path, step: str) -> dict[str, Any]:
    """``directory``'s manifest, refused unless ``step`` wrote it."""
    rerun = _rerun_hint(step)
    try:
        manifest = _read_manifest(directory)
    except FileNotFoundError:
        raise ManifestMismatchError(
            f"{directory} is not a finished {step} output (no {MANIFEST_NAME}); {rerun}"
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ManifestMismatchError(f"{directory / MANIFEST_NAME} is not valid JSON ({err}); {rerun}") from None
    if not isinstance(manifest, dict) or manifest.get("step") != step or not isinstance(manifest.get("files"), dict):
        raise ManifestMismatchError(f"{directory / MANIFEST_NAME} is not a manifest written by {step}; {rerun}")
    return manifest


def _check_file(directory: Path, manifest: dict[str, Any], step: str, name: str, *, contents: bool = True) -> None:
    path, entry = directory / name, manifest["files"].get(name)
    if not isinstance(entry, dict):
        raise ManifestMismatchError(f"{path} is not listed in the {step} manifest; {_rerun_hint(step)}")
    if "symlink" in entry or path.is_symlink():
        if not path.is_symlink() or os.readlink(path) != entry.get("symlink"):
            raise ManifestMismatchError(f"{path} is not the link {step} made; {_rerun_hint(step)}")
        return
    if not path.is_file():
        raise ManifestMismatchError(f"{path} is listed in its manifest but missing; {_rerun_hint(step)}")
    if path.stat().st_size != entry.get("bytes") or (contents and file_digest(path) != entry.get("xxh3_128")):
        raise ManifestMismatchError(
            f"{path} changed after {step} wrote it (size or digest differs); {_rerun_hint(step)}"
        )


def _rerun_hint(step: str) -> str:
    return f"rebuild it (rerun {step}, e.g. snakemake --forcerun {step.replace('-', '_')} <target>)"


def _read_manifest(directory: Path) -> Any:
    return json.loads((directory / MANIFEST_NAME).read_text())


def read_manifest_step(directory: Path) -> str | None:
    """The step ``directory``'s manifest names (its files unchecked); None without a readable manifest."""
    try:
        manifest = _read_manifest(Path(directory))
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return manifest.get("step") if isinstance(manifest, dict) else None


def check_if_step_output(directory: Path, step: str, *, contents: bool = True) -> dict[str, Any] | None:
    """:func:`check_step_output` for a directory that may instead be a user's own (no manifest of ``step``)."""
    directory = Path(directory)
    if read_manifest_step(directory) != step:
        return None
    return check_step_output(directory, step, contents=contents)
