"""``edgellm-export-draft``: export an EAGLE3 draft checkpoint for its base model to the Edge-LLM draft ONNX."""

from __future__ import annotations

import argparse

from edgellm_steps.cli import add_threads_argument, run_streaming_cli
from edgellm_steps.export.export_draft import export_draft


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="edgellm-export-draft", description=__doc__)
    parser.add_argument("--draft_model_dir", required=True, help="EAGLE3 draft checkpoint directory or hub id")
    parser.add_argument("--base_model_dir", required=True, help="the base model it drafts for (directory or hub id)")
    parser.add_argument("--output_dir", required=True, help="export directory (replaced whole when complete)")
    add_threads_argument(parser)
    args = parser.parse_args(argv)
    return run_streaming_cli(
        lambda: export_draft(args.draft_model_dir, args.base_model_dir, args.output_dir, threads=args.threads)
    )


if __name__ == "__main__":
    raise SystemExit(main())
