"""Writing files and directories so that a killed writer leaves nothing that looks finished.

Everything is written under a temporary name beside its destination and renamed
into place only when complete; ``rename`` within one directory is atomic.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

STAGING_PREFIX = ".staging-"


def write_if_changed(path: Path, data: bytes) -> bool:
    """Atomically write ``data`` to ``path`` unless it already holds exactly that.

    Returns whether the file was written. Leaving an unchanged file alone keeps
    its mtime, which is what keeps Snakemake from seeing a change.
    """
    try:
        if path.read_bytes() == data:
            return False
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return True


def staging_prefix(destination: Path) -> str:
    """The name prefix of ``destination``'s staging directories, unique to that destination.

    The name's length comes first, so no destination's prefix is a prefix of another's
    (``.staging-3-fp8-`` cannot match the staging of ``fp8-kvfp8``): several jobs that
    write into one parent directory at once never take each other's staging for a leftover.
    """
    name = Path(destination).name
    return f"{STAGING_PREFIX}{len(name)}-{name}-"


def remove_stale_staging(destination: Path) -> None:
    """Delete the staging directories that an interrupted run for ``destination`` left beside it.

    Only ``destination``'s own: a sibling job writing into the same parent keeps its staging.
    """
    parent, prefix = Path(destination).parent, staging_prefix(destination)
    if not parent.is_dir():
        return
    for entry in parent.iterdir():
        if entry.name.startswith(prefix) and entry.is_dir():
            log.info("removing leftover staging directory %s from an interrupted run", entry)
            shutil.rmtree(entry, ignore_errors=True)


def _replace_directory(staging: Path, destination: Path) -> None:
    if destination.exists():
        retired = Path(tempfile.mkdtemp(prefix=f"{staging_prefix(destination)}old-", dir=destination.parent))
        os.replace(destination, retired / destination.name)
        os.replace(staging, destination)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.replace(staging, destination)


@contextlib.contextmanager
def staged_directory(destination: Path, *, exclusive: bool = False) -> Iterator[Path]:
    """Yield an empty staging directory; on success move its files into ``destination``.

    By default files are moved one by one (``destination`` may already hold files
    of other steps, such as a LoRA graph beside the base graph), in sorted order
    except that ``model.onnx`` and ``manifest.json`` come last: a reader that finds
    the manifest finds everything it lists. With ``exclusive`` the step owns the
    whole directory: the staging directory replaces it, so no file of an earlier
    run (a shard of another name) survives. On failure the staging directory is
    removed and ``destination`` is left as it was.
    """
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(destination)
    staging = Path(tempfile.mkdtemp(prefix=staging_prefix(destination), dir=destination.parent))
    try:
        yield staging
        if exclusive:
            _replace_directory(staging, destination)
            return
        destination.mkdir(parents=True, exist_ok=True)
        last = ("model.onnx", "manifest.json")
        names = sorted(p.name for p in staging.iterdir())
        ordered = [n for n in names if n not in last] + [n for n in last if n in names]
        for name in ordered:
            os.replace(staging / name, destination / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
