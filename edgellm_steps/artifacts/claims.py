"""Which run may replace a destination: the one that started last.

When Snakemake itself is killed, the step it started runs on as an orphan. The
user unlocks and reruns, perhaps with new settings, and now the orphan and the
new job build the same destination. If the last to finish won, the orphan could
replace the new result with one built from the old settings while Snakemake's
records say the new one is there.

A claim file beside the destination settles it. Each run records its process
start time there (under an exclusive ``flock``) before it stages anything, and
replaces the destination only while holding that lock and finding its own
record still in the file. A run that finds a later start already recorded
stops at once with :class:`SupersededError`.

Start times are the kernel's record of when the process began, not when the
step got around to claiming: an orphan that was paused before it ever claimed
still loses to a job started after it. Runs on different hosts are compared by
wall-clock time, so hosts whose clocks disagree by more than the time between a
killed run and its rerun could misorder them.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from edgellm_steps.errors import EdgeLLMError

log = logging.getLogger(__name__)

CLAIM_PREFIX = ".claim-"


class SupersededError(EdgeLLMError):
    """A newer run for the same destination started after this one; this run must not commit."""


def destination_tag(destination: Path) -> str:
    """``<len(name)>-<name>`` of ``destination``: no destination's tag is a prefix of another's.

    The length comes first, so ``3-fp8`` cannot begin ``9-fp8-kvfp8``; the names of claim files
    and staging directories built on it never match a sibling destination's.
    """
    name = Path(destination).name
    return f"{len(name)}-{name}"


def claim_path(destination: Path) -> Path:
    """The claim file of ``destination``: hidden, beside it, its name unique to that destination."""
    return Path(destination).parent / f"{CLAIM_PREFIX}{destination_tag(destination)}"


def process_start_ns(pid: int | None = None) -> int:
    """When process ``pid`` (default: this one) was started, in nanoseconds since the epoch.

    Read from ``/proc``: the start time in clock ticks since boot (field 22 of
    ``stat``, counted after the parenthesised command name) plus the boot time.
    """
    pid = os.getpid() if pid is None else pid
    stat = Path(f"/proc/{pid}/stat").read_text()
    ticks = int(stat[stat.rindex(")") + 2 :].split()[19])
    boot_lines = Path("/proc/stat").read_text().splitlines()
    boot = next(int(line.split()[1]) for line in boot_lines if line.startswith("btime"))
    return boot * 1_000_000_000 + ticks * 1_000_000_000 // os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Claim:
    """This run's record in ``destination``'s claim file."""

    destination: Path
    started_ns: int
    token: str

    @property
    def path(self) -> Path:
        return claim_path(self.destination)

    @contextlib.contextmanager
    def committing(self) -> Iterator[None]:
        """Hold the claim file's lock while the destination is replaced; refuse if a newer run claimed it."""
        with _locked(self.path) as handle:
            current = _read(handle)
            if current != self.token:
                raise SupersededError(_superseded_message(self.destination, current))
            yield

    def superseded_error(self) -> SupersededError | None:
        """The :class:`SupersededError` to raise if a run started later has claimed the destination since; else None.

        For a run whose work failed midway: the later run removes this run's staging directory
        as a leftover (:func:`edgellm_steps.artifacts.atomic.remove_stale_staging`), so the
        orphan's next write fails on a missing directory. Asking here turns that into the
        one-line verdict the orphan owes its log, not a traceback. Reads under a shared lock
        without creating the claim file; not for use inside :meth:`committing`, whose lock a
        second open of the file in this process would wait on forever.
        """
        try:
            with open(self.path, "rb") as handle:
                fcntl.flock(handle.fileno(), fcntl.LOCK_SH)
                current = _read(handle)
        except FileNotFoundError:
            return None  # the claim file (or its directory) is gone: nobody claimed after this run
        if current and current != self.token and _started_ns(current) >= self.started_ns:
            return SupersededError(_superseded_message(self.destination, current))
        return None


def take_claim(destination: Path) -> Claim:
    """Record this run as the one that may replace ``destination``, unless a later-started run already is."""
    destination = Path(destination)
    started = process_start_ns()
    token = f"{started} {socket.gethostname()} {os.getpid()}"
    destination.parent.mkdir(parents=True, exist_ok=True)
    with _locked(claim_path(destination)) as handle:
        current = _read(handle)
        if current and _started_ns(current) > started:
            raise SupersededError(_superseded_message(destination, current))
        handle.seek(0)
        handle.truncate()
        handle.write(token.encode())
        handle.flush()
        os.fsync(handle.fileno())
    log.debug("claimed %s as %s", destination, token)
    return Claim(destination, started, token)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator:
    with open(os.open(path, os.O_RDWR | os.O_CREAT, 0o644), "r+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        yield handle  # closing the file releases the lock


def _read(handle) -> str:
    handle.seek(0)
    return handle.read().decode(errors="replace").strip()


def _started_ns(token: str) -> int:
    try:
        return int(token.split()[0])
    except (IndexError, ValueError):
        return 0  # an unreadable claim file belongs to nobody


def _superseded_message(destination: Path, current: str) -> str:
    parts = current.split()
    if len(parts) == 3:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(_started_ns(current) / 1e9))
        newer = f"a run started later (pid {parts[2]} on {parts[1]}, started {when})"
    else:
        newer = "a run started later"
    return (
        f"{destination} now belongs to {newer}: this run's result is discarded and {destination} is left"
        " to that run (an orphan of a killed workflow stops here)"
    )
