"""``edgellm-reduce-vocab``: choose the token ids a reduced-vocabulary LLM export keeps (vocab_map.safetensors)."""

from __future__ import annotations

import argparse

from edgellm_steps.cli import run_cli
from edgellm_steps.export.reduce_vocab import reduce_vocab


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="edgellm-reduce-vocab", description=__doc__)
    parser.add_argument("--model_dir", required=True, help="the base checkpoint (directory or hub id)")
    parser.add_argument("--output_dir", required=True, help="directory for vocab_map.safetensors")
    parser.add_argument("--reduced_vocab_size", type=int, required=True, help="how many ids to keep")
    parser.add_argument(
        "--draft_model_dir", default=None, help="an EAGLE3 draft: every base id its d2t reaches is kept"
    )
    parser.add_argument(
        "--corpus", default=None, help="token frequencies from a .txt/.jsonl file or directory (default: built-in)"
    )
    args = parser.parse_args(argv)
    if args.reduced_vocab_size < 1:
        parser.error("--reduced_vocab_size must be at least 1")
    return run_cli(
        lambda: reduce_vocab(
            args.model_dir,
            args.output_dir,
            size=args.reduced_vocab_size,
            draft_dir=args.draft_model_dir,
            corpus=args.corpus,
        )
    )


if __name__ == "__main__":
    raise SystemExit(main())
