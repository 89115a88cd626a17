"""``edgellm-export-visual``: export the vision tower of an HF vision-language checkpoint to ONNX."""

from __future__ import annotations

import argparse

from edgellm_steps.cli import add_threads_argument, run_streaming_cli
from edgellm_steps.export.export_visual import VISUAL_PRECISIONS, export_visual


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="edgellm-export-visual", description=__doc__)
    parser.add_argument("--model_dir", required=True, help="HF vision-language checkpoint directory or hub id")
    parser.add_argument("--output_dir", required=True, help="export directory (replaced whole when complete)")
    parser.add_argument(
        "--quantization",
        default="fp16",
        choices=VISUAL_PRECISIONS,
        help="weights of the tower's Linear layers (fp8: calibrated on generated images; patch embedding stays fp16)",
    )
    add_threads_argument(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_streaming_cli(
        lambda: export_visual(args.model_dir, args.output_dir, quantization=args.quantization, threads=args.threads)
    )


if __name__ == "__main__":
    raise SystemExit(main())
