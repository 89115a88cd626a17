"""``edgellm-dequantize-fp8``: a block-FP8 release (Qwen's, DeepSeek's ``*-FP8``) -> its float checkpoint."""

from __future__ import annotations

import argparse

from edgellm_steps.cli import run_streaming_cli
from edgellm_steps.quant.dequantize_fp8 import dequantize_fp8


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="edgellm-dequantize-fp8", description=__doc__)
    parser.add_argument("--model_dir", required=True, help="the block-FP8 checkpoint (directory or hub id)")
    parser.add_argument("--output_dir", required=True, help="float checkpoint directory (replaced when complete)")
    args = parser.parse_args(argv)
    return run_streaming_cli(lambda: dequantize_fp8(args.model_dir, args.output_dir))


if __name__ == "__main__":
    raise SystemExit(main())
