"""``edgellm-quantize-llm``: quantize an HF checkpoint with NVIDIA ModelOpt (CPU or CUDA)."""

from __future__ import annotations

import argparse

from edgellm_steps.cli import run_cli
from edgellm_steps.quant.precision import KV_CACHE_PRECISIONS, LM_HEAD_PRECISIONS, WEIGHT_PRECISIONS
from edgellm_steps.quant.quantize_llm import DEFAULT_CALIB_MAX_TOKENS, DEFAULT_CALIB_SIZE, quantize_llm


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="edgellm-quantize-llm", description=__doc__)
    parser.add_argument("--model_dir", required=True, help="HF checkpoint directory or hub id")
    parser.add_argument("--output_dir", required=True, help="quantized checkpoint directory")
    parser.add_argument("--quantization", required=True, choices=WEIGHT_PRECISIONS)
    parser.add_argument("--lm_head_quantization", default=None, choices=LM_HEAD_PRECISIONS)
    parser.add_argument("--kv_cache_quantization", default=None, choices=KV_CACHE_PRECISIONS)
    parser.add_argument(
        "--dataset_dir",
        default=None,
        help="calibration text: a .txt/.jsonl file or directory, or a HF dataset id (default: built-in corpus)",
    )
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--calib_size", type=int, default=DEFAULT_CALIB_SIZE, help="calibration samples")
    parser.add_argument(
        "--calib_max_tokens", type=int, default=DEFAULT_CALIB_MAX_TOKENS, help="tokens per calibration sample"
    )
    parser.add_argument(
        "--calib_batch_size", type=int, default=None, help="calibration batch (default: 1, or 16 for int4_awq)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads of torch (torch.set_num_threads; default: torch's, i.e. OMP_NUM_THREADS or the cores)",
    )
    args = parser.parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            parser.error("--threads must be at least 1")
        import torch

        torch.set_num_threads(args.threads)
    return run_cli(
        lambda: quantize_llm(
            args.model_dir,
            args.output_dir,
            quantization=args.quantization,
            lm_head_quantization=args.lm_head_quantization,
            kv_cache_quantization=args.kv_cache_quantization,
            dataset_dir=args.dataset_dir,
            device=args.device,
            calib_size=args.calib_size,
            calib_max_tokens=args.calib_max_tokens,
            calib_batch_size=args.calib_batch_size,
        )
    )


if __name__ == "__main__":
    raise SystemExit(main())
