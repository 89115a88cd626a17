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


def current_umask() -> int:
    """The process's file mode creation mask, read without changing it (Linux reports it in ``/proc``).

    Elsewhere the mask is set and put back at once, which is safe before any thread writes files.
    """
    with contextlib.suppress(OSError, ValueError, StopIteration):
        status = Path("/proc/self/status").read_text().splitlines()
        return int(next(line for line in status if line.startswith("Umask:")).split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _as_if_created(path: Path | int, directory: bool = False) -> None:
    """Give what ``mkstemp`` (0600) or ``mkdtemp`` (0700) made the mode an ordinary ``open`` or ``mkdir`` gives.

    The temporary names' private modes would otherwise survive the rename into place, and on a
    shared cluster the team's engines and exports would be readable by their builder alone.
    """
    mode = (0o777 if directory else 0o666) & ~current_umask()
    if isinstance(path, int):
        os.fchmod(path, mode)
    else:
        os.chmod(path, mode)


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
        _as_if_created(fd)
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
    """Delete what an interrupted run for ``destination`` left staged beside it: directories and files.

    Only ``destination``'s own: a sibling job writing into the same parent keeps its staging.
    Called right after this run claimed ``destination``, so staging still being written by an
    older run (an orphan of a killed workflow) goes too: that run is superseded and could never
    commit it; :func:`staged_directory` and :func:`write_claimed` have it report so.
    """
    parent, prefix = Path(destination).parent, staging_prefix(destination)
    if not parent.is_dir():
        return
    for entry in parent.iterdir():
        if not entry.name.startswith(prefix):
            continue
        log.info("removing leftover staging %s from an interrupted run", entry)
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                entry.unlink()


def claim_file(destination: Path) -> Claim:
    """Claim the single file ``destination`` and remove its staging leftovers; commit with :func:`write_claimed`.

    The file counterpart of entering :func:`staged_directory`: for a step whose output is one
    file inside a directory it does not own (insert-lora's ``lora_model.onnx`` in an export),
    so replacing the whole directory is not an option.
    """
    claim = take_claim(destination)
    remove_stale_staging(destination)
    return claim


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
        _as_if_created(staging, directory=True)
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
    """Write ``data`` to the claimed file unless a later-started run claimed it since; returns whether it wrote.

    ``data`` is staged under the destination's :func:`staging_prefix` (so the next
    :func:`claim_file` removes what a killed run left) and renamed into place only while
    holding the claim; a superseded run raises :class:`SupersededError` and leaves the file
    alone. A file that already holds ``data`` is not rewritten: its mtime stays, and Snakemake
    sees no change.
    """
    destination = claim.destination
    fd, name = tempfile.mkstemp(prefix=staging_prefix(destination), dir=destination.parent)
    staged = Path(name)
    try:
        _as_if_created(fd)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        with claim.committing():
            if _holds(destination, data):
                return False
            with contextlib.suppress(FileNotFoundError):
                os.replace(staged, destination)
                return True
        # The staged file is gone. Its whole directory may have been replaced (export-llm rewrites the
        # directory lora_model.onnx lives in), taking the claim file this run locked with it: the
        # claim file now at the path says whether a later run took over.
        raise claim.superseded_error() or _vanished_staging(staged, destination)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(staged)


def _holds(path: Path, data: bytes) -> bool:
    """Whether ``path`` holds exactly ``data``; sizes are compared first, so a changed file is seldom read."""
    try:
        return path.stat().st_size == len(data) and path.read_bytes() == data
    except (FileNotFoundError, IsADirectoryError):
        return False
