"""``edgellm-export-llm``: export an HF decoder checkpoint to the Edge-LLM ONNX directory."""

from __future__ import annotations

import argparse

from edgellm_steps.cli import add_threads_argument, run_streaming_cli
from edgellm_steps.export.export_llm import export_llm


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="edgellm-export-llm", description=__doc__)
    parser.add_argument("--model_dir", required=True, help="HF checkpoint directory or hub id")
    parser.add_argument("--output_dir", required=True, help="export directory (replaced whole when complete)")
    parser.add_argument("--chat_template", default=None, help="processed chat template JSON replacing the derived one")
    parser.add_argument(
        "--is_eagle_base",
        action="store_true",
        help="the EAGLE3 base graph: tree attention, several selected tokens, the hidden_states output",
    )
    parser.add_argument(
        "--reduced_vocab_dir", default=None, help="keep only the lm_head rows of this vocab_map (edgellm-reduce-vocab)"
    )
    add_threads_argument(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_streaming_cli(
        lambda: export_llm(
            args.model_dir,
            args.output_dir,
            chat_template=args.chat_template,
            eagle_base=args.is_eagle_base,
            reduced_vocab_dir=args.reduced_vocab_dir,
            threads=args.threads,
        )
    )


if __name__ == "__main__":
    raise SystemExit(main())
