"""Which code implements a step: the project modules its command imports, found by reading them.

A step's jobs rerun when its implementation changes, so the digest recorded as a rule
param must cover every project module the step's command can execute. The set is the
import closure of the step's CLI module, computed from the source with ``ast`` (nothing is
imported, so planning stays light): ``import edgellm_steps.x``, ``from edgellm_steps.x
import y`` (``y`` counts when it is a module) and imports inside functions alike, plus the
``__init__.py`` of every package on the way. A module only another step imports is not in
the set, so editing it reruns that step's jobs and no others.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from functools import cache
from pathlib import Path

from edgellm_steps.artifacts import digests, steps

PACKAGE = "edgellm_steps"
PACKAGE_DIR = Path(__file__).resolve().parent.parent

#: The command module of each step that the workflow runs.
STEP_ENTRY_POINTS = {
    steps.EXPORT_LLM: f"{PACKAGE}.cli.export_llm",
    steps.EXPORT_VISUAL: f"{PACKAGE}.cli.export_visual",
    steps.EXPORT_DRAFT: f"{PACKAGE}.cli.export_draft",
    steps.REDUCE_VOCAB: f"{PACKAGE}.cli.reduce_vocab",
    steps.CALIBRATE_LLM: f"{PACKAGE}.cli.calibrate_llm",
    steps.QUANTIZE_LLM: f"{PACKAGE}.cli.quantize_llm",
    steps.QUANTIZE_DRAFT: f"{PACKAGE}.cli.quantize_draft",
    steps.INSERT_LORA: f"{PACKAGE}.cli.insert_lora",
    steps.PROCESS_LORA: f"{PACKAGE}.cli.process_lora",
    steps.MERGE_LORA: f"{PACKAGE}.cli.merge_lora",
    steps.DEQUANTIZE_FP8: f"{PACKAGE}.cli.dequantize_fp8",
    steps.VERIFY_ONNX: f"{PACKAGE}.cli.verify_onnx",
    steps.ACCURACY_REPORT: f"{PACKAGE}.cli.accuracy_report",
    steps.JOB_COSTS: f"{PACKAGE}.cli.job_costs",
    steps.BUILD_ENGINE: f"{PACKAGE}.cli.build_engine",
    steps.VERIFY_SIGNATURE: f"{PACKAGE}.cli.verify_signature",
}


def _module_file(module: str, package_dir: Path) -> Path | None:
    """The file of a project module (``edgellm_steps.a.b``), or None when it names no module."""
    parts = module.split(".")[1:]
    base = package_dir.joinpath(*parts)
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imported_modules(path: Path) -> frozenset[str]:
    """Every project module named by an import statement anywhere in ``path``."""
    return _imports_in(path.read_bytes(), str(path))


@cache
def _imports_in(source: bytes, filename: str) -> frozenset[str]:
    """The project modules ``source`` imports; kept per content, as the closures of the steps share most
    modules and parsing them is most of planning's start-up time."""
    found: set[str] = set()
    for node in _statements(ast.parse(source, filename=filename).body):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.split(".")[0] == PACKAGE}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == PACKAGE:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return frozenset(found)


#: The fields through which a statement holds other statements (an import is a statement wherever it is).
_NESTED = ("body", "orelse", "finalbody", "handlers", "cases")


def _statements(nodes: list[ast.AST]) -> Iterator[ast.AST]:
    """Every statement in ``nodes`` and nested in them, skipping expressions (most of a module's nodes)."""
    for node in nodes:
        yield node
        for field in _NESTED:
            children = getattr(node, field, None)
            if isinstance(children, list):
                yield from _statements(children)


def _with_parents(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def import_closure(entry: str, package_dir: Path = PACKAGE_DIR) -> list[Path]:
    """The files of every project module ``entry`` imports, directly or not, ``entry`` included; sorted."""
    seen: dict[str, Path] = {}
    pending = [entry]
    while pending:
        module = pending.pop()
        for name in _with_parents(module):
            if name in seen:
                continue
            path = _module_file(name, package_dir)
            if path is None:  # ``from x import function``: the name is not a module
                continue
            seen[name] = path
            pending += sorted(_imported_modules(path))
    return sorted(set(seen.values()))


@cache
def step_code_digest(step: str, package_dir: Path = PACKAGE_DIR) -> str:
    """A digest of the code that implements ``step``, over its import closure; recorded as a rule param."""
    files = import_closure(STEP_ENTRY_POINTS[step], package_dir)
    parts = [f"{path.relative_to(package_dir).as_posix()}:{digests.bytes_digest(path.read_bytes())}" for path in files]
    return digests.bytes_digest("\n".join(parts).encode())[:16]
