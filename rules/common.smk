# Config validation, wildcard constraints and the few helpers that let rules ask the planner.
# The logic lives in edgellm_steps.workflow (planning.py and below); these helpers only turn a
# user error into one line on stderr and stop the plan before any job runs.
import logging
import os
import shlex
import sys

from snakemake_interface_executor_plugins.settings import DeploymentMethod

from edgellm_steps.artifacts import steps
from edgellm_steps.errors import EdgeLLMError
from edgellm_steps.export.kinds import DRAFT, EAGLE_BASE, LLM, VISUAL
from edgellm_steps.workflow import targets
from edgellm_steps.workflow.planning import Planner, load_workflow_config
from edgellm_steps.workflow.step_code import STEP_ENTRY_POINTS, step_code_digest
from edgellm_steps.workflow.targets import export_outputs


def abort(err):
    sys.stderr.write(f"Error: {err}\n")
    raise SystemExit(1)


# What planning warns of (a source the runtime would run wrongly, but which builds) reaches the user.
_WARNINGS = logging.StreamHandler(sys.stderr)
_WARNINGS.setLevel(logging.WARNING)
_WARNINGS.setFormatter(logging.Formatter("Warning: %(message)s"))
logging.getLogger("edgellm_steps.workflow").addHandler(_WARNINGS)

try:
    PLAN = Planner(load_workflow_config(config))
except EdgeLLMError as err:
    abort(err)

INPUTS, RESOURCES = PLAN.inputs, PLAN.resources


wildcard_constraints:
    **targets.WILDCARDS,


def _answer(method, wildcards, names):
    try:
        return method(*(wildcards.get(name) for name in names))
    except EdgeLLMError as err:
        abort(err)


def ask(method, *names):
    """An input, params or resources function: ``method`` of the named wildcards.

    A params function of ``wildcards`` alone is recorded: a changed answer reruns the job.
    """

    def of_wildcards(wildcards):
        return _answer(method, wildcards, names)

    return of_wildcards


def ask_unrecorded(method, *names):
    """A params function Snakemake does not record (it takes ``input``): paths whose content is tracked
    elsewhere, so moving a checkpoint or the venv reruns nothing."""

    def of_wildcards_and_input(wildcards, input):
        return _answer(method, wildcards, names)

    return of_wildcards_and_input


def all_engine_targets():
    return _answer(PLAN.all_engines, {}, ())


def all_export_targets():
    return _answer(PLAN.all_exports, {}, ())


def step_code(name):
    """A recorded param: editing a step's implementation reruns its jobs.

    The digest is computed when a job of this step is planned (step_code_digest caches it), not at
    parse time, so a plan pays only for its own steps.
    """
    return lambda wildcards: f"{name} implementation {step_code_digest(name)}"


# Under --software-deployment-method conda the step runs in the rule's env, whose pip section
# installs this checkout: envs/*.yaml read its path from EDGELLM_STEPS_ROOT when conda creates them.
USES_CONDA = DeploymentMethod.CONDA in workflow.deployment_settings.deployment_method
if USES_CONDA:
    os.environ.update(EDGELLM_STEPS_ROOT=workflow.basedir)


def step_command(name):
    """The step's command: run by the interpreter that runs Snakemake (no activated venv or PATH
    needed), or by the conda env's python when Snakemake deploys the rules' conda envs.

    A function of `input`, so not recorded: where the venv lives does not change what is built.
    """
    python = "python" if USES_CONDA else shlex.quote(sys.executable)
    command = f"{python} -m {STEP_ENTRY_POINTS[name]}"
    return lambda wildcards, input: command


def step(name):
    """The params of every rule: the step's code (recorded) and its command (not recorded)."""
    return {"code": step_code(name), "command": step_command(name)}


def engine_inputs(wildcards):
    inputs = _answer(INPUTS.engine, wildcards, ("model", "precision", "sm"))
    # Processed adapters are linked into the engine directory, not built in: reprocessing one reruns no engine.
    return {k: ancient(v) if k.startswith("adapter_") else v for k, v in inputs.items()}


def relative_to_link(wildcards, input):
    return os.path.relpath(input.engine, "engines")
