"""The conda env files the rules name (envs/*.yaml): present, pinned as constraints.txt, parseable by pip.

`--software-deployment-method conda` itself is not run here: no conda channel is reachable in CI.
These are the checks that need neither conda nor a network.

How the project's path in a pip section resolves (what `conda_pip_path` models):
- conda writes the pip section to a temporary requirements file in the directory of the env file it
  was given and runs pip there (conda/env/installers/pip.py: pip_workdir = dirname(abspath(file))),
  so a relative `-e` path is relative to that directory;
- Snakemake (9.27.1, snakemake/deployment/conda.py, Env.create) does not hand conda the rule's file:
  it copies it to `<conda prefix>/<hash>.yaml` (default prefix `.snakemake/conda` in the working
  directory) and runs `conda env create --file` on the copy, so a path relative to envs/ misses;
- pip expands `${NAME}` (uppercase, digits, `_`) from the environment in requirements files, and
  leaves an unset one as it is.
Hence the env files name the checkout as `${EDGELLM_STEPS_ROOT}`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

from .support import REPO

ENVS = REPO / "envs"
ENV_FILES = sorted(ENVS.glob("*.yaml"))
ROOT_VAR = "EDGELLM_STEPS_ROOT"
#: pip's requirements-file expansion (pip._internal.req.req_file.ENV_VAR_RE): `${NAME}` only.
PIP_ENV_VAR = re.compile(r"\$\{([A-Z0-9_]+)\}")
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
#: Pinned in an env file but absent from constraints.txt (the CPU dev venv's freeze, which never
#: installs it): must carry the pin of pyproject's optional extra instead.
EXTRA_ONLY = {"tensorrt": "engine"}


def pins(lines) -> dict[str, Version]:
    """Canonical name -> pinned version of `name==version` lines (comments, blanks skipped)."""
    result = {}
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if line:
            requirement = Requirement(line)
            (spec,) = requirement.specifier
            assert spec.operator == "==", line
            result[canonicalize_name(requirement.name)] = Version(spec.version)
    return result


CONSTRAINTS = pins((REPO / "constraints.txt").read_text().splitlines())


def load(env_file: Path) -> tuple[list[str], list[str]]:
    """(conda specs, pip section lines) of an env file."""
    data = yaml.safe_load(env_file.read_text())
    assert set(data) <= {"name", "channels", "dependencies", "variables"}, env_file.name
    conda, pip = [], []
    for dependency in data["dependencies"]:
        if isinstance(dependency, dict):
            assert set(dependency) == {"pip"}, dependency
            pip.extend(dependency["pip"])
        else:
            conda.append(dependency)
    if pip:
        assert "pip" in conda, f"{env_file.name}: a pip section needs the pip package"
    return conda, pip


def is_requirement(line: str) -> bool:
    """A requirement specifier (`name==1.0`), as opposed to an option line (`-e path`, `-c file`)."""
    return not line.startswith("-")


def option_values(pip: list[str], *names: str) -> list[str]:
    """The values of the option lines `-x value` / `--xx value` / `--xx=value` among `names`."""
    values = []
    for line in pip:
        if not is_requirement(line):
            option, _, value = line.partition(" ")
            if "=" in option:
                option, _, value = line.partition("=")
            if option in names:
                values.append(value.strip())
    return values


def conda_pip_path(entry: str, env_file: Path, environ: dict[str, str]) -> Path:
    """Where conda, run on `env_file`, has pip look for a path from the file's pip section."""
    expanded = PIP_ENV_VAR.sub(lambda match: environ.get(match.group(1)) or match.group(0), entry)
    return (env_file.parent / expanded).resolve()


def rules():
    """(rules file, rule name, rule body) for every rule in rules/*.smk."""
    for smk in sorted((REPO / "rules").glob("*.smk")):
        for match in re.finditer(r"^rule (\w+):\n((?:(?:[ \t].*)?\n)*)", smk.read_text(), re.MULTILINE):
            yield smk, match.group(1), match.group(2)


def rule_env(smk: Path, body: str) -> Path:
    """The env file a rule's `conda:` names: Snakemake resolves it against the rules file's directory."""
    match = re.search(r"^    conda:\s*\n\s+\"([^\"]+)\"", body, re.MULTILINE)
    assert match, f"{smk.name}: a rule without a `conda:` env file"
    return (smk.parent / match.group(1)).resolve()


RULES = list(rules())
STEP_ENVS = sorted({rule_env(smk, body) for smk, _, body in RULES if "**step(" in body})


def test_rules_and_env_files_found():
    assert len(RULES) >= 5, [name for _, name, _ in RULES]
    assert [path.name for path in STEP_ENVS] == ["engine.yaml", "export.yaml"]
    assert {path.name for path in ENV_FILES} >= {"coreutils.yaml", "engine.yaml", "export.yaml"}


@pytest.mark.parametrize(("smk", "name", "body"), RULES, ids=[name for _, name, _ in RULES])
def test_rule_env_file_exists(smk, name, body):
    env_file = rule_env(smk, body)
    assert env_file.is_file(), f"rule {name}: {env_file} does not exist"
    assert env_file.parent == ENVS, f"rule {name}: {env_file} is not in envs/"


@pytest.mark.parametrize("env_file", ENV_FILES, ids=[path.name for path in ENV_FILES])
def test_conda_pins(env_file):
    """A conda package constraints.txt pins has its version; python is the one pyproject.toml allows."""
    conda, _ = load(env_file)
    for spec in conda:
        match = re.fullmatch(r"([A-Za-z0-9_.\-]+)\s*(?:(==|=|>=|<=|>|<|!=)\s*([^\s=]+))?", spec)
        assert match, f"{env_file.name}: cannot read the conda spec {spec!r}"
        name, operator, version = match.groups()
        if name == "python":
            assert operator in ("=", "=="), f"{env_file.name}: python {spec!r} is not one version"
            assert Version(version) in SpecifierSet(PYPROJECT["project"]["requires-python"]), spec
        elif canonicalize_name(name) in CONSTRAINTS:
            assert operator in ("=", "=="), f"{env_file.name}: {spec!r} is not pinned"
            assert Version(version) == CONSTRAINTS[canonicalize_name(name)], (
                f"{env_file.name}: {spec!r}, constraints.txt pins {CONSTRAINTS[canonicalize_name(name)]}"
            )


def test_one_python_for_all_envs():
    versions = {spec for env_file in ENV_FILES for spec in load(env_file)[0] if spec.startswith("python")}
    assert len(versions) == 1, versions


@pytest.mark.parametrize("env_file", ENV_FILES, ids=[path.name for path in ENV_FILES])
def test_pip_pins(env_file):
    """Every pip requirement is an exact pin, the one constraints.txt (or pyproject's extra) has."""
    _, pip = load(env_file)
    for line in filter(is_requirement, pip):
        requirement = Requirement(line)
        name = canonicalize_name(requirement.name)
        specs = list(requirement.specifier)
        assert len(specs) == 1 and specs[0].operator == "==", f"{env_file.name}: {line!r} is not an exact pin"
        version = Version(specs[0].version)
        if name in CONSTRAINTS:
            assert version == CONSTRAINTS[name], f"{env_file.name}: {line!r}, constraints.txt pins {CONSTRAINTS[name]}"
        else:
            assert name in EXTRA_ONLY, f"{env_file.name}: {line!r} is pinned nowhere in constraints.txt"
            extra = pins(PYPROJECT["project"]["optional-dependencies"][EXTRA_ONLY[name]])
            assert version == extra[name], f"{env_file.name}: {line!r}, pyproject's extra pins {extra[name]}"


@pytest.mark.parametrize("env_file", STEP_ENVS, ids=[path.name for path in STEP_ENVS])
def test_step_env_installs_this_checkout(env_file, tmp_path):
    """`-e` names the checkout and `-c` its constraints.txt, wherever conda is given the env file."""
    _, pip = load(env_file)
    editables = option_values(pip, "-e", "--editable")
    constraints = option_values(pip, "-c", "--constraint")
    assert len(editables) == 1, f"{env_file.name}: the project is not installed editable (-e) once"
    assert len(constraints) == 1, f"{env_file.name}: no single -c constraints file"
    snakemake_copy = tmp_path / "workdir" / ".snakemake" / "conda" / "0123456789abcdef.yaml"
    other_checkout = tmp_path / "other-checkout"
    for given in (env_file, snakemake_copy):  # conda env create -f envs/x.yaml, and Snakemake's copy
        root = conda_pip_path(editables[0], given, {ROOT_VAR: str(REPO)})
        assert root == REPO, f"{env_file.name}: -e {editables[0]} resolves to {root} from {given}"
        assert (root / "pyproject.toml").is_file()
        constraints_file = conda_pip_path(constraints[0], given, {ROOT_VAR: str(REPO)})
        assert constraints_file == REPO / "constraints.txt", f"{env_file.name}: -c resolves to {constraints_file}"
        # The path follows the variable: no hard-coded location of one checkout.
        assert conda_pip_path(editables[0], given, {ROOT_VAR: str(other_checkout)}) == other_checkout


@pytest.mark.parametrize("env_file", STEP_ENVS, ids=[path.name for path in STEP_ENVS])
def test_step_env_has_the_index_of_local_versions(env_file):
    """constraints.txt pins CPU wheels (`+cpu`): an env installing under it needs PyTorch's CPU index."""
    _, pip = load(env_file)
    if any(version.local == "cpu" for version in CONSTRAINTS.values()):
        indexes = option_values(pip, "--extra-index-url", "--index-url", "-i")
        assert any(url.rstrip("/").endswith("/whl/cpu") for url in indexes), f"{env_file.name}: {indexes}"


@pytest.mark.skipif(importlib.util.find_spec("setuptools") is None, reason="needs setuptools (no build isolation)")
@pytest.mark.parametrize("env_file", STEP_ENVS, ids=[path.name for path in STEP_ENVS])
def test_pip_reads_the_pip_section(env_file, tmp_path):
    """pip itself, offline, on the option lines as conda would hand them over (requirement lines above).

    Offline: --no-index (so --extra-index-url is read, not used), --no-deps, the build backend of the
    running venv; --isolated keeps the machine's pip configuration out.
    """
    _, pip = load(env_file)
    requirements = tmp_path / "condaenv.test.requirements.txt"
    requirements.write_text("\n".join(line for line in pip if not is_requirement(line)) + "\n")
    report = tmp_path / "report.json"
    offline = ["--isolated", "--dry-run", "--no-deps", "--no-index", "--no-build-isolation", "--quiet"]
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", *offline, "--report", str(report), "-r", str(requirements)],
        cwd=tmp_path,
        env={**os.environ, ROOT_VAR: str(REPO)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    installs = json.loads(report.read_text())["install"]
    assert [item["metadata"]["name"] for item in installs] == [PYPROJECT["project"]["name"]]
    assert installs[0]["download_info"]["dir_info"].get("editable") is True
