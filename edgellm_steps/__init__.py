"""Incremental build steps for TensorRT Edge-LLM artifacts.

Every step of the workflow is a plain function in this package; the console
scripts in :mod:`edgellm_steps.cli` and the Snakemake rules are thin callers.
"""

__version__ = "0.1.0"

#: The Edge-LLM runtime release line whose artifact contract the exports follow.
EDGELLM_VERSION = "0.5.0"
