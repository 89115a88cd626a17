"""Model sources: where a checkpoint is, and a content summary Snakemake can compare.

A source is summarized as one small *stamp* file per checkpoint file, holding
that file's xxh3-128 digest. Stamps are rewritten only when a digest changes, so
their mtimes move exactly when content moves: touching or copying a checkpoint
plans nothing, a changed byte in one shard makes its stamp (and the dry-run
reason, which names it) newer than the export.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

from edgellm_steps.artifacts.atomic import write_if_changed
from edgellm_steps.artifacts.digests import DigestCache
from edgellm_steps.errors import SourceError

log = logging.getLogger(__name__)

STATE_DIR = Path(".edgellm")
STAMP_SUFFIX = ".xxh3"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


def resolve_source(source: str, *, model: str | None = None, allow_download: bool = False) -> Path:
    """Return the local checkpoint directory for ``source`` (a path or a hub id).

    The workflow never downloads while planning (``allow_download=False``): a hub
    id must already be in the local HuggingFace cache. CLIs allow the download.
    """
    owner = f"model '{model}': " if model else ""
    path = Path(source).expanduser()
    if path.is_dir():
        return path.resolve()
    if path.exists():
        raise SourceError(
            f"{owner}source '{source}' is a file, not a checkpoint directory; point source at the directory"
        )
    if not _HUB_ID.match(source):
        raise SourceError(
            f"{owner}source directory '{source}' does not exist; fix source in your config "
            "(a checkpoint directory, relative to the work directory, or a HuggingFace hub id)"
        )
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(source, local_files_only=not allow_download))
    except LocalEntryNotFoundError as err:
        raise SourceError(
            f"{owner}source '{source}' is neither a local directory nor in the HuggingFace cache; "
            f"download it first with `hf download {source}` or set source to a local directory"
        ) from err
    except HfHubHTTPError as err:
        raise SourceError(f"{owner}cannot download '{source}': {err}; check the hub id and your network") from err


def read_json_object(path: Path, *, owner: str = "", what: str = "an object") -> dict[str, Any]:
    """A JSON file that must hold an object, or one line naming the file and what is wrong with it."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as err:
        raise SourceError(f"{owner}{path} cannot be read ({err.strerror or err}); check that it exists") from err
    except (ValueError, RecursionError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise SourceError(f"{owner}{path} is not valid JSON ({err}); repair or re-download it") from err
    if not isinstance(data, dict):
        raise SourceError(f"{owner}{path} holds a JSON {type(data).__name__}, not {what}; repair or re-download it")
    return data


def read_hf_config(checkpoint: Path, *, model: str | None = None) -> dict:
    """The checkpoint's ``config.json``, or a :class:`SourceError` saying what is wrong."""
    owner = f"model '{model}': " if model else ""
    config_path = checkpoint / "config.json"
    if not config_path.is_file():
        raise SourceError(
            f"{owner}{checkpoint} has no config.json, so it is not a HuggingFace checkpoint; "
            "point source at the directory that holds config.json"
        )
    return read_json_object(config_path, owner=owner, what="the object of an HF config")


def checkpoint_files(checkpoint: Path) -> list[Path]:
    """Every regular file of a checkpoint, relative, skipping hidden entries (.git, .cache)."""
    files = []
    for path in sorted(checkpoint.rglob("*")):
        relative = path.relative_to(checkpoint)
        if any(part.startswith(".") for part in relative.parts):
            continue
        if path.is_file():
            files.append(relative)
    return files


def refresh_stamps(checkpoint: Path, stamp_dir: Path, cache: DigestCache) -> list[Path]:
    """Bring the stamps of ``checkpoint`` in ``stamp_dir`` up to date and return them.

    Only stamps whose digest changed are rewritten; stamps of files that no
    longer exist are deleted.
    """
    stamps = []
    for relative in checkpoint_files(checkpoint):
        stamp = stamp_dir / (str(relative) + STAMP_SUFFIX)
        digest = cache.digest(checkpoint / relative)
        if write_if_changed(stamp, f"{digest}\n".encode()):
            log.info("source file %s changed (content digest %s)", checkpoint / relative, digest[:12])
        stamps.append(stamp)
    wanted = set(stamps)
    if stamp_dir.is_dir():
        for old in stamp_dir.rglob("*" + STAMP_SUFFIX):
            if old not in wanted:
                old.unlink()
    cache.save()
    return stamps
