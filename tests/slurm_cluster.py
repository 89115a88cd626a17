"""A throwaway single-node Slurm cluster on loopback, for the cluster-profile test.

Facts it relies on (Debian's slurm-wlm 22.05 and munge): the daemons run as root
without systemd; the job-step plugin drops SLURM_CONF, so the config must be
/etc/slurm/slurm.conf; there is no accounting daemon, so status comes from
squeue; a gres ``gpu`` backed by /dev/null lets Slurm schedule "GPU" jobs
without a GPU. Everything started here is stopped at teardown, and a
configuration this module did not write is never touched.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

MARKER = "# written by the edgellm-steps test suite"
CONF = Path("/etc/slurm/slurm.conf")
GRES = Path("/etc/slurm/gres.conf")
PID_FILES = {"slurmd": Path("/run/slurmd.pid"), "slurmctld": Path("/run/slurmctld.pid")}
FEATURE = "sm87"


class ClusterUnavailable(Exception):
    """Why the cluster cannot be started here (the test skips with this reason)."""


def _memory_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024 - 1024
    return 4096


def _config(host: str) -> str:
    node = f"CPUs={os.cpu_count()} RealMemory={_memory_mb()} Gres=gpu:1 Feature={FEATURE}"
    return f"""{MARKER}
ClusterName=edgellmtest
SlurmctldHost={host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile={PID_FILES["slurmctld"]}
SlurmdPidFile={PID_FILES["slurmd"]}
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
ReturnToService=2
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
GresTypes=gpu
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
NodeName={host} NodeAddr=127.0.0.1 {node} State=UNKNOWN
PartitionName=main Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


DAEMONS = ("slurmd", "slurmctld", "munged")


def _stop_daemons(timeout: float = 15) -> None:
    """Stop every daemon and wait until none is left: a restart must not race the old ones' sockets."""
    for pid_file in PID_FILES.values():
        with suppress(FileNotFoundError, ValueError, ProcessLookupError):
            os.kill(int(pid_file.read_text().strip()), signal.SIGTERM)
    for name in DAEMONS:
        subprocess.run(["pkill", "-x", name], check=False)
    deadline = time.monotonic() + timeout
    while any(_running(name) for name in DAEMONS):
        if time.monotonic() > deadline:
            for name in DAEMONS:
                subprocess.run(["pkill", "-KILL", "-x", name], check=False)
            break
        time.sleep(0.2)


def _running(name: str) -> bool:
    return subprocess.run(["pgrep", "-x", name], capture_output=True, check=False).returncode == 0


def _wait_idle(timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, check=False).stdout
        if state.strip() == "idle":
            return
        time.sleep(0.5)
    raise ClusterUnavailable(f"the Slurm node did not become idle in {timeout:.0f} s (sinfo: {state.strip()!r})")


@contextmanager
def local_slurm() -> Iterator[str]:
    """Start munge, slurmctld and slurmd; yield the node name; stop them all."""
    if os.geteuid() != 0:
        raise ClusterUnavailable("starting slurmctld and slurmd needs root")
    missing = [d for d in ("munged", "slurmctld", "slurmd", "sbatch") if not shutil.which(d)]
    if missing:
        raise RuntimeError(f"Slurm is not installed ({', '.join(missing)} missing): run `make cluster-deps`")
    if CONF.exists() and MARKER not in CONF.read_text():
        raise ClusterUnavailable(f"{CONF} belongs to a real Slurm installation; not replacing it")
    _stop_daemons()
    host = socket.gethostname().split(".")[0]
    for directory in ("/var/spool/slurmctld", "/var/spool/slurmd", "/var/log/slurm", "/run/munge"):
        Path(directory).mkdir(parents=True, exist_ok=True)
    shutil.chown("/run/munge", "munge", "munge")
    CONF.parent.mkdir(parents=True, exist_ok=True)
    CONF.write_text(_config(host))
    GRES.write_text(f"{MARKER}\nNodeName={host} Name=gpu File=/dev/null\n")
    try:
        subprocess.run(["runuser", "-u", "munge", "--", "munged"], check=True)
        subprocess.run(["slurmctld"], check=True)
        subprocess.run(["slurmd"], check=True)
        _wait_idle()
        yield host
    finally:
        _stop_daemons()
        for path in (CONF, GRES):
            if path.exists() and MARKER in path.read_text():
                path.unlink()
