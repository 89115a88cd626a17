"""``edgellm-process-lora``: a PEFT LoRA adapter -> the runtime's ``processed_adapter_model.safetensors``."""

from __future__ import annotations

import argparse

from edgellm_steps.cli import run_cli
from edgellm_steps.lora.process_lora import process_lora


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="edgellm-process-lora", description=__doc__)
    parser.add_argument("--input_dir", required=True, help="PEFT adapter directory or hub id")
    parser.add_argument("--output_dir", required=True, help="processed adapter directory (replaced when complete)")
    parser.add_argument("--model_dir", help="the base model: every adapted module must be a LoRA input of its graph")
    args = parser.parse_args(argv)
    return run_cli(lambda: process_lora(args.input_dir, args.output_dir, model_dir=args.model_dir))


if __name__ == "__main__":
    raise SystemExit(main())
