"""The library's house: packages in one order, each importing only those below it, and no import cycle.

Read from the source with ``ast`` (nothing is imported), counting imports inside functions too: a lazy
import does not hide an import against the order or a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from edgellm_steps.workflow.step_code import PACKAGE, PACKAGE_DIR

#: Each package's level: a module may import its own package and those of a lower level only.
LEVELS = {
    "errors": 0,
    "graph": 0,
    "artifacts": 1,
    "models": 2,
    "quant": 3,
    "plugins": 4,
    "export": 5,
    "lora": 6,
    "verify": 7,
    "engine": 7,
    "workflow": 8,
    "cli": 9,
}


def module_name(path: Path, package_dir: Path) -> str:
    parts = path.relative_to(package_dir.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """The project modules (or names in them) that ``path`` imports, anywhere in the file."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_bytes(), filename=str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.split(".")[0] == PACKAGE}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import; name the module absolutely"
            if (node.module or "").split(".")[0] == PACKAGE:
                found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found


def resolve(name: str, modules: set[str]) -> str | None:
    """The longest project module that ``name`` (a module, or a name inside one) refers to."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in modules:
            return candidate
    return None


def package_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def level_of(module: str) -> int:
    """The package root (``edgellm_steps/__init__.py``, version facts only) sits at the bottom."""
    return LEVELS[package_of(module)] if package_of(module) else 0


def import_graph(package_dir: Path = PACKAGE_DIR) -> dict[str, set[str]]:
    files = {module_name(path, package_dir): path for path in sorted(package_dir.rglob("*.py"))}
    modules = set(files)
    graph = {}
    for module, path in files.items():
        targets = {resolve(name, modules) for name in imports_of(path)}
        graph[module] = {t for t in targets if t is not None and t != module}
    return graph


def against_the_order(graph: dict[str, set[str]]) -> list[str]:
    return sorted(
        f"{module} imports {target}"
        for module, targets in graph.items()
        for target in targets
        if package_of(target) != package_of(module)
        and (level_of(target) > level_of(module) or (level_of(target) == level_of(module) and package_of(target)))
    )


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every import cycle, as the path that closes it (depth-first search over the module graph)."""
    found, state = [], {}

    def visit(module: str, stack: list[str]) -> None:
        state[module] = "open"
        for target in sorted(graph.get(module, ())):
            if state.get(target) == "open":
                found.append([*stack[stack.index(target) :], target])
            elif target not in state:
                visit(target, [*stack, target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    return found


def test_every_package_has_a_level():
    packages = {path.name for path in PACKAGE_DIR.iterdir() if (path / "__init__.py").is_file()}
    modules = {path.stem for path in PACKAGE_DIR.glob("*.py") if path.stem != "__init__"}
    assert packages | modules == set(LEVELS)


def test_no_import_runs_against_the_order():
    assert against_the_order(import_graph()) == []


def test_no_import_cycle():
    assert cycles(import_graph()) == []


@pytest.mark.parametrize(
    ("files", "kind"),
    [
        ({"artifacts/a.py": "from edgellm_steps.workflow.b import x\n", "workflow/b.py": "x = 1\n"}, "order"),
        ({"quant/a.py": "def f():\n    from edgellm_steps.export import b\n", "export/b.py": ""}, "order"),
        ({"verify/a.py": "import edgellm_steps.engine.b\n", "engine/b.py": ""}, "order"),
        (
            {"models/a.py": "from edgellm_steps.models import b\n", "models/b.py": "import edgellm_steps.models.a\n"},
            "cycle",
        ),
    ],
)
def test_the_checks_catch_a_bad_house(tmp_path, files, kind):
    """Negative controls: an upward import (lazy or not), a sibling import, a cycle within a package."""
    root = tmp_path / PACKAGE
    for name, text in {"__init__.py": "", **files}.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        (path.parent / "__init__.py").touch()
        path.write_text(text)
    graph = import_graph(root)
    assert (against_the_order(graph) != []) == (kind == "order")
    assert (cycles(graph) != []) == (kind == "cycle")


def test_no_module_is_over_400_lines():
    long = {
        str(p.relative_to(PACKAGE_DIR)): n
        for p in PACKAGE_DIR.rglob("*.py")
        if (n := len(p.read_text().splitlines())) > 400
    }
    assert long == {}
