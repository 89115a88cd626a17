"""``edgellm-quantize-llm``: quantize an HF checkpoint with NVIDIA ModelOpt (CPU or CUDA)."""

from __future__ import annotations

import argparse

from edgellm_steps.cli import run_cli
from edgellm_steps.quant.precision import GRAMMAR
from edgellm_steps.quant.quantize_llm import DEFAULT_CALIB_MAX_TOKENS, DEFAULT_CALIB_SIZE, quantize_llm


def add_quantization_arguments(parser: argparse.ArgumentParser, calib_size: int, calib_max_tokens: int) -> None:
    """The precision, calibration and device flags quantize-llm and quantize-draft share."""
    parser.add_argument("--precision", required=True, help=f"the precision to make: {GRAMMAR}")
    parser.add_argument(
        "--dataset_dir",
        default=None,
        help="calibration text: a .txt/.jsonl file or directory, or a HF dataset id (default: built-in corpus)",
    )
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--calib_size", type=int, default=calib_size, help="calibration samples")
    parser.add_argument("--calib_max_tokens", type=int, default=calib_max_tokens, help="tokens per calibration sample")
    parser.add_argument(
        "--calib_batch_size", type=int, default=None, help="calibration batch (default: 1, or 16 for int4_awq)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads of torch (torch.set_num_threads; default: torch's, i.e. OMP_NUM_THREADS or the cores)",
    )


def quantization_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict:
    """The parsed flags as keyword arguments of the quantize functions; applies ``--threads``."""
    if args.threads is not None:
        if args.threads < 1:
            parser.error("--threads must be at least 1")
        import torch

        torch.set_num_threads(args.threads)
    names = ("precision", "dataset_dir", "device")
    names += ("calib_size", "calib_max_tokens", "calib_batch_size")
    return {name: getattr(args, name) for name in names}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="edgellm-quantize-llm", description=__doc__)
    parser.add_argument("--model_dir", required=True, help="HF checkpoint directory or hub id")
    parser.add_argument("--output_dir", required=True, help="quantized checkpoint directory")
    add_quantization_arguments(parser, DEFAULT_CALIB_SIZE, DEFAULT_CALIB_MAX_TOKENS)
    args = parser.parse_args(argv)
    options = quantization_options(parser, args)
    return run_cli(lambda: quantize_llm(args.model_dir, args.output_dir, **options))


if __name__ == "__main__":
    raise SystemExit(main())
