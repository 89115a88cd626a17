"""``edgellm-calibrate-llm``: the shared calibration pass of a model (activation maxima for quantize-llm)."""

from __future__ import annotations

import argparse

from edgellm_steps.cli import add_torch_threads_argument, run_cli, use_torch_threads
from edgellm_steps.quant.calibrate_llm import calibrate_llm
from edgellm_steps.quant.calibration_source import DEFAULT_CALIB_MAX_TOKENS, DEFAULT_CALIB_SIZE

#: The flags that say what to calibrate on (unset ones take the step's defaults).
CALIBRATION_FLAGS = ("dataset_dir", "calib_size", "calib_max_tokens", "calib_batch_size")


def add_calibration_arguments(parser: argparse.ArgumentParser, calib_size: int, calib_max_tokens: int) -> None:
    """The calibration, device and thread flags of calibrate-llm, quantize-llm and quantize-draft."""
    parser.add_argument(
        "--dataset_dir",
        default=None,
        help="calibration text: a .txt/.jsonl file or directory, or a HF dataset id (default: built-in corpus)",
    )
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--calib_size", type=int, default=None, help=f"calibration samples (default: {calib_size})")
    parser.add_argument(
        "--calib_max_tokens",
        type=int,
        default=None,
        help=f"tokens per calibration sample (default: {calib_max_tokens})",
    )
    parser.add_argument(
        "--calib_batch_size", type=int, default=None, help="calibration batch (default: 1, or 16 for int4_awq)"
    )
    add_torch_threads_argument(parser)


def calibration_options(args: argparse.Namespace) -> dict:
    """The parsed calibration flags that were given, as keyword arguments; applies ``--threads``."""
    use_torch_threads(args.threads)
    options = {"device": args.device}
    options.update({name: getattr(args, name) for name in CALIBRATION_FLAGS if getattr(args, name) is not None})
    return options


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="edgellm-calibrate-llm", description=__doc__)
    parser.add_argument("--model_dir", required=True, help="HF checkpoint directory or hub id")
    parser.add_argument("--output_dir", required=True, help="statistics directory (quantize-llm's --statistics_dir)")
    add_calibration_arguments(parser, DEFAULT_CALIB_SIZE, DEFAULT_CALIB_MAX_TOKENS)
    args = parser.parse_args(argv)
    options = calibration_options(args)
    return run_cli(lambda: calibrate_llm(args.model_dir, args.output_dir, **options))


if __name__ == "__main__":
    raise SystemExit(main())
