"""What every benchmark shares: its command line, measuring one step in a child process, recording runs.

The benchmarks are modules of the ``bench`` package, run from the checkout's root:

    .venv/bin/python -m bench.export_bench 0.5b

so they import each other and this module as a package does, with no ``sys.path`` edits.

Each run appends its figures to ``bench/results/<bench>.json``: a JSON list with one object per
measured step (``case``, ``wall_s``, ``peak_rss_bytes``, ``peak_rss_mib``, ``peak_rss_printed_gb``,
the bench's own details, ``date``, ``machine``, ``source``), so that figures cited elsewhere (the
workflow's memory model, the README) have one file to point at and to be checked against, instead
of a docstring. ``peak_rss_printed_gb`` is the figure the tables print and the targets use
(ru_maxrss KiB / 1e6, see :attr:`Measurement.peak_rss_gb`); runs transcribed from older prose have
only that figure, so their bytes and MiB are derived from it.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.metadata
import json
import logging
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
RESULTS = Path(__file__).resolve().parent / "results"
MIB = 2**20

log = logging.getLogger("bench")


@dataclass(frozen=True)
class Measurement:
    """Wall time and peak RSS of one child process."""

    wall_s: float
    #: The child's own ``ru_maxrss`` (KiB on Linux) in bytes.
    peak_rss_bytes: int

    @property
    def peak_rss_gb(self) -> float:
        """Peak RSS as the tables print it and the targets are written: ru_maxrss (KiB) / 1e6.

        That is units of 1.024e9 bytes, not GB; kept so that new figures compare with the targets
        and with the runs recorded before (3.40 printed = 3.40e6 KiB = 3320 MiB).
        """
        return round(self.peak_rss_bytes / 1024 / 1e6, 2)

    @property
    def peak_rss_mib(self) -> float:
        return round(self.peak_rss_bytes / MIB, 1)


def measure_command(command: list[str], stderr: Any = subprocess.DEVNULL) -> tuple[int, Measurement]:
    """Run ``command`` alone and return its exit code, wall seconds and peak RSS (its own ru_maxrss).

    ``os.wait4`` gives this child's own rusage; RUSAGE_CHILDREN would also count earlier children,
    such as a checkpoint generator. Checkpoints are generated in a separate process for the same
    reason: a child forked from a large parent would inherit the parent's RSS in ru_maxrss.
    """
    started = time.monotonic()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.monotonic() - started
    return os.waitstatus_to_exitcode(status), Measurement(wall, usage.ru_maxrss * 1024)


def run_measured(command: list[str]) -> Measurement:
    """:func:`measure_command` for a step that must succeed: a failure ends the benchmark."""
    code, measured = measure_command(command)
    if code != 0:
        raise SystemExit(f"failed (exit {code}): {' '.join(command)}")
    return measured


def module_command(module: str, *args: str) -> list[str]:
    """``python -m module args``: a benchmark re-running itself (e.g. ``--generate-only``) in a fresh process.

    The child inherits the working directory and environment that let this process import ``bench``.
    """
    return [sys.executable, "-m", module, *args]


def run_export(name: str, command: list[str], output: Path, log_path: Path) -> tuple[int, Measurement, float | None]:
    """Run one export command alone; returns its exit code, measurement and onnx_model.data size (GB, 1e9 bytes)."""
    log.info("%s export: %s (log %s)", name, " ".join(command), log_path)
    with log_path.open("w") as stderr:
        code, measured = measure_command(command, stderr=stderr)
    data = output / "onnx_model.data"
    data_gb = data.stat().st_size / 1e9 if code == 0 and data.is_file() else None
    if code != 0:
        tail = log_path.read_text(errors="replace").splitlines()[-25:]
        log.error("%s export failed (exit %d); end of %s:\n%s", name, code, log_path, "\n".join(tail))
    else:
        log.info(
            "%s export: %.1f s, %s GB peak RSS, %.2f GB data", name, measured.wall_s, measured.peak_rss_gb, data_gb
        )
    return code, measured, data_gb


def print_export_table(rows: list[tuple], targets: dict[str, dict[str, float]], targets_label: str = "targets") -> int:
    """Print (name, exit code, measurement, data GB) rows as a Markdown table; 0 when every export succeeded."""
    print(f"| export | wall (s) | peak RSS (GB) | onnx_model.data (GB) | {targets_label} |")
    print("|---|---|---|---|---|")
    for name, code, measured, data_gb in rows:
        goal = ", ".join(f"{k} <= {v}" for k, v in targets[name].items())
        size = f"{data_gb:.2f}" if data_gb is not None else f"failed (exit {code})"
        print(f"| {name} | {measured.wall_s:.1f} | {measured.peak_rss_gb} | {size} | {goal} |")
    return 0 if all(code == 0 for _, code, _, _ in rows) else 1


def bench_parser(description: str | None, *, workdir: bool = True, keep: str | None = None) -> argparse.ArgumentParser:
    """The options shared by every benchmark, so that all of them are run and recorded the same way.

    ``--workdir`` and ``--keep`` where the benchmark writes files; ``--note`` and ``--no-record`` always.
    """
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    if workdir:
        parser.add_argument("--workdir", type=Path, default=Path("build/bench"), help="default: build/bench")
    if keep:
        parser.add_argument("--keep", action="store_true", help=keep)
    parser.add_argument(
        "--note", default="", help="what the results file should say about this machine beyond its cores and RAM"
    )
    parser.add_argument(
        "--no-record", action="store_true", help="print only; append nothing to bench/results/<bench>.json"
    )
    return parser


def machine_note(note: str = "") -> str:
    """This machine in a few words (cores, RAM, Python, torch), plus the caller's ``note``."""
    ram_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    parts = [f"{os.cpu_count()} cores", f"{ram_gib:.0f} GiB RAM", f"{platform.system()} {platform.machine()}"]
    parts.append(f"Python {platform.python_version()}")
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        parts.append(f"torch {importlib.metadata.version('torch')}")
    return ", ".join(parts) + (f"; {note}" if note else "")


def run_record(case: str, measured: Measurement | None, **details: Any) -> dict[str, Any]:
    """One measured step as the results file holds it; ``details`` are the bench's own fields."""
    return {
        "case": case,
        "wall_s": round(measured.wall_s, 2) if measured else None,
        "peak_rss_bytes": measured.peak_rss_bytes if measured else None,
        "peak_rss_mib": measured.peak_rss_mib if measured else None,
        "peak_rss_printed_gb": measured.peak_rss_gb if measured else None,
        **details,
    }


def record(bench: str, runs: list[dict[str, Any]], note: str = "") -> Path:
    """Append ``runs`` (from :func:`run_record`) to ``bench/results/<bench>.json``, dated, with the machine."""
    path = RESULTS / f"{bench}.json"
    recorded = json.loads(path.read_text()) if path.is_file() else []
    stamp = {
        "date": datetime.date.today().isoformat(),
        "machine": machine_note(note),
        "source": f"measured by python -m bench.{bench}",
    }
    recorded += [{**run, **stamp} for run in runs]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(recorded, indent=2) + "\n")
    log.info("recorded %d run(s) in %s", len(runs), path)
    return path
