"""``edgellm-quantize-draft``: quantize an EAGLE3 draft with NVIDIA ModelOpt, calibrated through its base model."""

from __future__ import annotations

import argparse

from edgellm_steps.cli import run_cli
from edgellm_steps.cli.quantize_llm import add_quantization_arguments, quantization_options
from edgellm_steps.quant.quantize_draft import DEFAULT_DRAFT_CALIB_MAX_TOKENS, DEFAULT_DRAFT_CALIB_SIZE, quantize_draft


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="edgellm-quantize-draft", description=__doc__)
    parser.add_argument("--base_model_dir", required=True, help="the unquantized base model (directory or hub id)")
    parser.add_argument("--draft_model_dir", required=True, help="EAGLE3 draft checkpoint directory or hub id")
    parser.add_argument("--output_dir", required=True, help="quantized draft directory")
    add_quantization_arguments(parser, DEFAULT_DRAFT_CALIB_SIZE, DEFAULT_DRAFT_CALIB_MAX_TOKENS)
    args = parser.parse_args(argv)
    options = quantization_options(args)
    return run_cli(lambda: quantize_draft(args.base_model_dir, args.draft_model_dir, args.output_dir, **options))


if __name__ == "__main__":
    raise SystemExit(main())
