"""Holding a claimed file writer (insert-lora) at the exact point of its commit, through its own claim lock.

A writer takes its claim under an exclusive ``flock`` of the claim file, stages, then commits under
the same lock (edgellm_steps.artifacts.claims, .atomic). A test holding that lock stops the writer at
one of those two points; which one, ``/proc/locks`` says (it lists every process waiting on a lock,
by pid and inode). To let the claim through yet stop the commit, the gate swaps a second, locked
file into the claim file's place while the writer waits on the first, then lets the first go: the
writer records its claim, stages, and waits on the second. Its token is copied into the second, so
what a rerun finds is what the writer left. Nothing is timed: a kill there leaves exactly what a
step killed just before its rename leaves, and an orphan held there commits exactly when the test says.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import time
from pathlib import Path
from typing import BinaryIO

import psutil

from edgellm_steps.artifacts.claims import claim_path


def _waiter_on(handle: BinaryIO) -> int | None:
    """The pid of a process blocked on ``handle``'s file lock, per ``/proc/locks``; None if there is none."""
    inode = os.fstat(handle.fileno()).st_ino
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        if len(fields) > 6 and fields[1] == "->" and int(fields[6].split(":")[-1]) == inode:
            return int(fields[5])
    return None


class CommitGate:
    """Used as ``with CommitGate(destination) as gate:``: holds ``destination``'s claim lock from the start."""

    def __init__(self, destination: Path) -> None:
        self.path = claim_path(destination)
        self._first: BinaryIO | None = None
        self._second: BinaryIO | None = None

    def __enter__(self) -> CommitGate:
        self._first = _locked(self.path)
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in (self._first, self._second):
            if handle is not None:
                handle.close()

    def hold(self, started: subprocess.Popen, timeout: float = 120) -> int:
        """Let the writer ``started`` runs (itself or a descendant) claim, then hold it at its commit; its pid.

        Returns once the writer has staged everything and waits for the lock to rename it into place.
        """
        assert self._first is not None, "use the gate as a context manager"
        pid = self._wait_for_waiter(self._first, started, timeout, "claim")
        staging = self.path.with_name(f"{self.path.name}.gate")
        self._second = _locked(staging)
        os.replace(staging, self.path)
        fcntl.flock(self._first.fileno(), fcntl.LOCK_UN)  # the writer takes its claim on the old file
        assert self._wait_for_waiter(self._second, started, timeout, "commit") == pid
        self._first.seek(0)
        token = self._first.read()
        assert token.split()[-1] == str(pid).encode(), token
        self._second.write(token)
        self._second.flush()
        return pid

    def release(self) -> None:
        """Let the held writer (or the next claimant) take the lock."""
        assert self._second is not None, "nothing is held"
        self._second.close()
        self._second = None

    @staticmethod
    def _wait_for_waiter(handle: BinaryIO, started: subprocess.Popen, timeout: float, point: str) -> int:
        deadline = time.monotonic() + timeout
        while (pid := _waiter_on(handle)) is None:
            assert started.poll() is None, f"the writer finished without waiting at its {point} (took no claim?)"
            assert time.monotonic() < deadline, f"the writer never reached its {point}"
            time.sleep(0.005)
        return pid


def stopped(pid: int, timeout: float = 60) -> psutil.Process:
    """``pid`` suspended (SIGSTOP), returned once the kernel has stopped it.

    Until then a writer woken from its lock wait still takes the lock before it stops, so a
    gate released any sooner would hand the commit to the process the test means to hold.
    """
    process = psutil.Process(pid)
    process.suspend()
    deadline = time.monotonic() + timeout
    while process.status() != psutil.STATUS_STOPPED:
        assert time.monotonic() < deadline, f"process {pid} did not stop"
        time.sleep(0.005)
    return process


def _locked(path: Path) -> BinaryIO:
    handle = open(os.open(path, os.O_RDWR | os.O_CREAT, 0o644), "r+b")  # noqa: SIM115 (closed by the gate)
    fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
    return handle
