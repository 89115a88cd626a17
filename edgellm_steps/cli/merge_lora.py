"""``edgellm-merge-lora``: fold a PEFT LoRA adapter into its model's weights (a merged checkpoint)."""

from __future__ import annotations

import argparse

from edgellm_steps.cli import run_streaming_cli
from edgellm_steps.lora.merge_lora import merge_lora


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="edgellm-merge-lora", description=__doc__)
    parser.add_argument("--model_dir", required=True, help="the float base model (directory or hub id)")
    parser.add_argument("--adapter_dir", required=True, help="PEFT adapter directory or hub id")
    parser.add_argument("--output_dir", required=True, help="merged checkpoint directory (replaced when complete)")
    args = parser.parse_args(argv)
    return run_streaming_cli(lambda: merge_lora(args.model_dir, args.adapter_dir, args.output_dir))


if __name__ == "__main__":
    raise SystemExit(main())
