"""``edgellm-calibrate-llm``: the shared calibration pass of a model (activation maxima for quantize-llm)."""

from __future__ import annotations

import argparse

from edgellm_steps.cli import run_cli
from edgellm_steps.cli.quantize_llm import add_calibration_arguments, calibration_options
from edgellm_steps.quant.calibrate_llm import calibrate_llm
from edgellm_steps.quant.quantize_llm import DEFAULT_CALIB_MAX_TOKENS, DEFAULT_CALIB_SIZE


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="edgellm-calibrate-llm", description=__doc__)
    parser.add_argument("--model_dir", required=True, help="HF checkpoint directory or hub id")
    parser.add_argument("--output_dir", required=True, help="statistics directory (quantize-llm's --statistics_dir)")
    add_calibration_arguments(parser, DEFAULT_CALIB_SIZE, DEFAULT_CALIB_MAX_TOKENS)
    args = parser.parse_args(argv)
    options = calibration_options(parser, args)
    return run_cli(lambda: calibrate_llm(args.model_dir, args.output_dir, **options))


if __name__ == "__main__":
    raise SystemExit(main())
