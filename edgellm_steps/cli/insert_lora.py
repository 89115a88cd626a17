"""``edgellm-insert-lora``: add LoRA inputs to an exported LLM graph, as ``lora_model.onnx`` beside ``model.onnx``."""

from __future__ import annotations

import argparse

from edgellm_steps.cli import run_cli
from edgellm_steps.lora.insert_lora import insert_lora


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="edgellm-insert-lora", description=__doc__)
    parser.add_argument("--onnx_dir", required=True, help="an export-llm output directory (its weights are not read)")
    args = parser.parse_args(argv)
    return run_cli(lambda: insert_lora(args.onnx_dir))


if __name__ == "__main__":
    raise SystemExit(main())
