"""Writing files and directories so that a killed writer leaves nothing that looks finished.

Everything is written under a temporary name beside its destination and renamed
into place only when complete; ``rename`` within one directory is atomic. Step
outputs are also claimed (:mod:`edgellm_steps.artifacts.claims`), so only the newest run of
a destination ever commits it.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from edgellm_steps.artifacts.claims import Claim, destination_tag, take_claim
from edgellm_steps.errors import EdgeLLMError

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

    Built on :func:`destination_tag` (``.staging-3-fp8-`` cannot match the staging of
    ``fp8-kvfp8``): several jobs that write into one parent directory at once never take
    each other's staging for a leftover.
    """
    return f"{STAGING_PREFIX}{destination_tag(destination)}-"


def remove_stale_staging(destination: Path) -> None:
    """Delete the staging directories that an interrupted run for ``destination`` left beside it.

    Only ``destination``'s own: a sibling job writing into the same parent keeps its staging.
    Called right after this run claimed ``destination``, so a staging directory still being
    written by an older run (an orphan of a killed workflow) goes too: that run is superseded
    and could never commit it; :func:`staged_directory` has it report so when its next write fails.
    """
    parent, prefix = Path(destination).parent, staging_prefix(destination)
    if not parent.is_dir():
        return
    for entry in parent.iterdir():
        if entry.name.startswith(prefix) and entry.is_dir():
            log.info("removing leftover staging directory %s from an interrupted run", entry)
            shutil.rmtree(entry, ignore_errors=True)


def _exchange(first: Path, second: Path) -> bool:
    """Swap two paths in one step (``renameat2`` with ``RENAME_EXCHANGE``); False where unsupported."""
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(first), at_fdcwd, os.fsencode(second), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False  # a kernel or file system without it
    raise OSError(err, os.strerror(err), str(second))


def _replace_directory(staging: Path, destination: Path) -> None:
    """Put ``staging`` in ``destination``'s place with one rename; what was there is deleted after.

    A reader sees the old directory or the new one, never a mix. Where the file system
    cannot exchange two paths, the old directory is first renamed aside: a reader may
    then briefly find no directory, still never files of two runs.
    """
    if not destination.exists() and not destination.is_symlink():
        os.rename(staging, destination)
        return
    if _exchange(staging, destination):
        shutil.rmtree(staging, ignore_errors=True)  # now the previous content
        return
    retired = Path(tempfile.mkdtemp(prefix=f"{staging_prefix(destination)}old-", dir=destination.parent))
    os.replace(destination, retired / destination.name)
    os.rename(staging, destination)
    shutil.rmtree(retired, ignore_errors=True)


@contextlib.contextmanager
def staged_directory(destination: Path) -> Iterator[Path]:
    """Yield an empty staging directory; on success it becomes ``destination``, whole, in one rename.

    The step owns ``destination``: no file of an earlier run (a shard of another name,
    half an interrupted export) survives. The run first claims the destination
    (:mod:`edgellm_steps.artifacts.claims`) and commits only if no later-started run has claimed
    it since, so an orphan of a killed workflow never replaces a newer result. On
    failure the staging directory is removed and ``destination`` is left as it was.

    The newer run deletes the orphan's staging directory as a leftover, so the orphan's
    next write inside the ``with`` block fails, as whatever its writer raises for a missing
    directory (``FileNotFoundError``; torch's and safetensors' own errors). Any failure of
    the block is therefore checked against the claim first: superseded, the run raises
    :class:`SupersededError`, one line, like an orphan that reaches the commit.
    """
    destination = Path(destination)
    claim = take_claim(destination)
    remove_stale_staging(destination)
    staging = Path(tempfile.mkdtemp(prefix=staging_prefix(destination), dir=destination.parent))
    try:
        try:
            yield staging
        except Exception as err:
            if (superseded := claim.superseded_error()) is not None:
                raise superseded from err
            if not staging.is_dir():
                raise _vanished_staging(staging, destination) from err
            raise
        with claim.committing():
            if not staging.is_dir():
                raise _vanished_staging(staging, destination)
            _replace_directory(staging, destination)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _vanished_staging(staging: Path, destination: Path) -> EdgeLLMError:
    """The error of a run whose staging directory was deleted under it while no later run claimed the destination."""
    return EdgeLLMError(
        f"{staging}, where this run was building {destination}, was deleted while the run wrote into it "
        f"(by hand, or by a cleanup of the directory); nothing was committed and {destination} is left as it was: "
        "rerun the step"
    )


def write_claimed(claim: Claim, data: bytes) -> bool:
    """Write ``data`` to the claimed file unless a later-started run claimed it since; see :func:`write_if_changed`."""
    with claim.committing():
        return write_if_changed(claim.destination, data)
