# Config validation, wildcard constraints and the input/params functions of all rules.
# The logic lives in edgellm_steps.workflow.planning; these wrappers only turn a user error
# into one line on stderr and stop the plan before any job runs.
import os
import shlex
import sys

from snakemake_interface_executor_plugins.settings import DeploymentMethod

from edgellm_steps.errors import EdgeLLMError
from edgellm_steps.workflow.planning import Planner, load_workflow_config
from edgellm_steps.workflow.step_code import STEP_ENTRY_POINTS, step_code_digest


def abort(err):
    sys.stderr.write(f"Error: {err}\n")
    raise SystemExit(1)


try:
    PLAN = Planner(load_workflow_config(config))
except EdgeLLMError as err:
    abort(err)


wildcard_constraints:
    # A model, or a merged variant <model>+<adapter> (the model with a merge: true adapter folded in).
    model=r"[A-Za-z0-9][A-Za-z0-9.\-]*(\+[A-Za-z0-9][A-Za-z0-9.\-]*)?",
    base=r"[A-Za-z0-9][A-Za-z0-9.\-]*",
    precision=r"[A-Za-z0-9_\-]+",
    sm=r"\d+",
    draft_precision=r"[A-Za-z0-9_\-]+",
    adapter=r"[A-Za-z0-9][A-Za-z0-9.\-]*",


def ask(question, *args):
    try:
        return question(*args)
    except EdgeLLMError as err:
        abort(err)


def all_engine_targets():
    return ask(PLAN.all_engines)


def all_export_targets():
    return ask(PLAN.all_exports)


def step_code(step):
    """A recorded param: editing a step's implementation reruns its jobs."""
    version = f"{step} implementation {step_code_digest(step)}"
    return lambda wildcards: version


# Under --software-deployment-method conda the step runs in the rule's env, whose pip section
# installs this checkout: envs/*.yaml read its path from EDGELLM_STEPS_ROOT when conda creates them.
USES_CONDA = DeploymentMethod.CONDA in workflow.deployment_settings.deployment_method
if USES_CONDA:
    os.environ.update(EDGELLM_STEPS_ROOT=workflow.basedir)


def step_command(step):
    """The step's command: run by the interpreter that runs Snakemake (no activated venv or PATH
    needed), or by the conda env's python when Snakemake deploys the rules' conda envs.

    A function of `input`, so not recorded: where the venv lives does not change what is built.
    """
    python = "python" if USES_CONDA else shlex.quote(sys.executable)
    command = f"{python} -m {STEP_ENTRY_POINTS[step]}"
    return lambda wildcards, input: command


def export_llm_inputs(wildcards):
    return ask(PLAN.export_inputs, wildcards.model, wildcards.precision)


def eagle_base_inputs(wildcards):
    return ask(PLAN.eagle_base_inputs, wildcards.model, wildcards.precision)


def export_draft_inputs(wildcards):
    return ask(PLAN.export_draft_inputs, wildcards.model, wildcards.precision)


def draft_checkpoint(wildcards, input):
    # Not recorded (a function of `input`): the draft's content is, through its stamps.
    return str(ask(PLAN.draft_checkpoint, wildcards.model))


def draft_export_checkpoint(wildcards, input):
    # Not recorded: what it holds is, through the quantized draft's manifest or the draft's stamps.
    return str(ask(PLAN.draft_export_checkpoint, wildcards.model))


def quantize_draft_inputs(wildcards):
    return ask(PLAN.quantize_draft_inputs, wildcards.model, wildcards.draft_precision)


def quantize_draft_options(wildcards):
    return ask(PLAN.quantize_draft_options, wildcards.model)


def quantize_draft_mem_mb(wildcards):
    return ask(PLAN.quantize_draft_mem_mb, wildcards.model)


def draft_engine_sm(wildcards):
    return ask(PLAN.draft_engine_sm, wildcards.model, wildcards.precision, wildcards.sm)


def engine_draft_option(wildcards, input):
    return f"--draft_engine_dir {input.draft}" if "draft" in input.keys() else ""


def export_visual_inputs(wildcards):
    return ask(PLAN.visual_inputs, wildcards.model)


def export_visual_options(wildcards):
    return ask(PLAN.visual_options, wildcards.model)


def engine_inputs(wildcards):
    inputs = ask(PLAN.engine_inputs, wildcards.model, wildcards.precision, wildcards.sm)
    # Processed adapters are linked into the engine directory, not built in: reprocessing one reruns no engine.
    return {k: ancient(v) if k.startswith("adapter_") else v for k, v in inputs.items()}


def engine_lora_option(wildcards, input):
    # A function of `input`: which adapters are linked follows the inputs, whose set is tracked.
    adapters = [
        k.removeprefix("adapter_") for k in input.keys() if k.startswith("adapter_")
    ]
    return " ".join(
        f"--lora_adapter {a}={os.path.dirname(input[f'adapter_{a}'])}" for a in adapters
    )


def insert_lora_inputs(wildcards):
    return ask(PLAN.lora_graph_inputs, wildcards.model, wildcards.precision)


def process_lora_inputs(wildcards):
    return ask(PLAN.process_lora_inputs, wildcards.model, wildcards.adapter)


def verify_lora_inputs(wildcards):
    return ask(
        PLAN.verify_lora_inputs, wildcards.model, wildcards.precision, wildcards.adapter
    )


def merge_lora_inputs(wildcards):
    return ask(PLAN.merge_lora_inputs, wildcards.base, wildcards.adapter)


def merge_lora_mem_mb(wildcards):
    return ask(PLAN.merge_lora_mem_mb, wildcards.base)


def merge_base_checkpoint(wildcards, input):
    # Not recorded: the model's content is, through its stamps.
    return str(ask(PLAN.checkpoint, wildcards.base))


def merge_adapter_checkpoint(wildcards, input):
    return str(ask(PLAN.adapter_checkpoint, wildcards.base, wildcards.adapter))


def adapter_checkpoint(wildcards, input):
    # Not recorded: the adapter's content is, through its stamps.
    return str(ask(PLAN.adapter_checkpoint, wildcards.model, wildcards.adapter))


def visual_engine_sm(wildcards):
    return ask(PLAN.visual_engine_sm, wildcards.model, wildcards.sm)


def visual_engine_limits(wildcards):
    limits = ask(PLAN.build_limits, wildcards.model, "visual")
    return " ".join(f"--{key} {value}" for key, value in sorted(limits.items()))


def engine_visual_option(wildcards, input):
    # A function of `input`: the vision engine directory is an input, so its changes already rerun the job.
    return f"--visual_engine_dir {input.visual}" if "visual" in input.keys() else ""


def verify_visual_inputs(wildcards):
    return ask(PLAN.verify_visual_inputs, wildcards.model)


def verify_visual_mem_mb(wildcards):
    return ask(PLAN.verify_visual_mem_mb, wildcards.model)


def verify_onnx_inputs(wildcards):
    return ask(PLAN.verify_inputs, wildcards.model, wildcards.precision)


def quantize_llm_inputs(wildcards):
    return ask(PLAN.quantize_inputs, wildcards.model, wildcards.precision)


def quantize_options(wildcards):
    return ask(PLAN.quantize_options, wildcards.model, wildcards.precision)


def quantize_device(wildcards, input):
    # Not recorded (a function of `input`): where calibration runs does not change what is built.
    return ask(PLAN.settings, wildcards.model).quantization.device


def source_checkpoint(wildcards, input):
    # A function of `input` is not recorded: moving a checkpoint reruns nothing
    # as long as its content (the source stamps) is unchanged.
    return str(ask(PLAN.checkpoint, wildcards.model))


def export_checkpoint(wildcards, input):
    if "quantized" in input.keys():
        return os.path.dirname(input.quantized)
    return source_checkpoint(wildcards, input)


def export_options(wildcards, input):
    options = []
    if "chat_template" in input.keys():
        options.append(f"--chat_template {input.chat_template}")
    if "vocab_map" in input.keys():
        options.append(f"--reduced_vocab_dir {os.path.dirname(input.vocab_map)}")
    return " ".join(options)


def reduce_vocab_inputs(wildcards):
    return ask(PLAN.reduce_vocab_inputs, wildcards.model)


def reduce_vocab_options(wildcards):
    return ask(PLAN.reduce_vocab_options, wildcards.model)


def reduce_vocab_draft(wildcards, input):
    # Not recorded: the draft's content is, through its stamps.
    return (
        f"--draft_model_dir {shlex.quote(str(PLAN.draft_checkpoint(wildcards.model)))}"
        if "draft" in input.keys()
        else ""
    )


def engine_sm(wildcards):
    return ask(
        PLAN.engine_sm, wildcards.model, wildcards.precision, wildcards.get("sm")
    )


def engine_limits(wildcards):
    limits = ask(PLAN.build_limits, wildcards.model)
    return " ".join(f"--{key} {value}" for key, value in sorted(limits.items()))


def engine_plugin(wildcards, input):
    # Not recorded: where the plugin library lives on a build host is not part of the engine.
    path = PLAN.engine_plugin_path()
    return f"--plugin_path {path}" if path else ""


def engine_mem_mb(wildcards):
    return ask(PLAN.engine_mem_mb, wildcards.model)


def quantize_mem_mb(wildcards):
    return ask(PLAN.quantize_mem_mb, wildcards.model, wildcards.precision)


def quantize_threads(wildcards):
    return ask(PLAN.quantize_threads, wildcards.model)


def quantize_gpus(wildcards):
    # Any GPU (no SM constraint): calibration on `quantization.device: cuda`.
    return ask(PLAN.quantize_gpus, wildcards.model)


def verify_mem_mb(wildcards):
    return ask(PLAN.verify_mem_mb, wildcards.model, wildcards.precision)


def verify_threads(wildcards):
    return ask(PLAN.verify_threads, wildcards.model)


def engine_constraint(wildcards):
    return PLAN.engine_constraint(wildcards.sm)


def engine_partition(wildcards):
    return PLAN.engine_partition(wildcards.sm)


def default_sm_engine(wildcards):
    sm = engine_sm(wildcards)
    return f"engines/sm{sm}/{wildcards.model}_{wildcards.precision}.engine"


def relative_to_link(wildcards, input):
    return os.path.relpath(input.engine, "engines")
