"""``edgellm-quantize-llm``: quantize an HF checkpoint with NVIDIA ModelOpt (CPU or CUDA)."""

from __future__ import annotations

import argparse

from edgellm_steps.cli import run_cli
from edgellm_steps.cli.calibrate_llm import CALIBRATION_FLAGS, add_calibration_arguments, calibration_options
from edgellm_steps.quant.precision import GRAMMAR
from edgellm_steps.quant.quantize_llm import DEFAULT_CALIB_MAX_TOKENS, DEFAULT_CALIB_SIZE, quantize_llm


def add_quantization_arguments(parser: argparse.ArgumentParser, calib_size: int, calib_max_tokens: int) -> None:
    """The precision and the calibration flags quantize-llm and quantize-draft share."""
    parser.add_argument("--precision", required=True, help=f"the precision to make: {GRAMMAR}")
    add_calibration_arguments(parser, calib_size, calib_max_tokens)


def quantization_options(args: argparse.Namespace) -> dict:
    """The parsed flags as keyword arguments of the quantize functions; applies ``--threads``."""
    return {"precision": args.precision, **calibration_options(args)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="edgellm-quantize-llm", description=__doc__)
    parser.add_argument("--model_dir", required=True, help="HF checkpoint directory or hub id")
    parser.add_argument("--output_dir", required=True, help="quantized checkpoint directory")
    parser.add_argument(
        "--statistics_dir",
        default=None,
        help="calibrate from the model's shared statistics (edgellm-calibrate-llm's output) instead of running it "
        "on calibration text (every precision but int4_awq)",
    )
    parser.add_argument(
        "--exclude",
        action="append",
        default=[],
        metavar="PATTERN",
        help="keep the decoder Linears whose stored module names match PATTERN (shell-style) in float; repeatable",
    )
    add_quantization_arguments(parser, DEFAULT_CALIB_SIZE, DEFAULT_CALIB_MAX_TOKENS)
    args = parser.parse_args(argv)
    options = {**quantization_options(args), "exclude": tuple(args.exclude)}
    if args.statistics_dir is not None:
        given = [f"--{name}" for name in CALIBRATION_FLAGS if name in options]
        if given:
            parser.error(f"{', '.join(given)}: the statistics were calibrated already; give them to calibrate-llm")
        options["statistics_dir"] = args.statistics_dir
    return run_cli(lambda: quantize_llm(args.model_dir, args.output_dir, **options))


if __name__ == "__main__":
    raise SystemExit(main())
