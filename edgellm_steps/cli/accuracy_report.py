"""``edgellm-accuracy-report``: perplexity, agreement with fp16 and size of a model's exports, on held-out text."""

from __future__ import annotations

import argparse

from edgellm_steps.cli import key_value, run_cli
from edgellm_steps.verify.accuracy import accuracy_report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="edgellm-accuracy-report", description=__doc__)
    parser.add_argument(
        "--export",
        type=key_value("--export", "PRECISION"),
        action="append",
        required=True,
        metavar="PRECISION=DIR",
        help="an LLM export directory and its precision; repeat for each, fp16 among them (the baseline)",
    )
    parser.add_argument(
        "--adapter",
        type=key_value("--adapter", "NAME"),
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="a served LoRA adapter (a process-lora output): each export's lora_model.onnx is measured fed with it",
    )
    parser.add_argument("--model_dir", required=True, help="the float checkpoint they came from (tokenizer, RoPE)")
    parser.add_argument("--model", default="model", help="the model's name, for the titles")
    parser.add_argument("--dataset", default=None, help="held-out text (.txt/.jsonl or a directory; default: built-in)")
    parser.add_argument("--samples", type=int, default=8, help="windows of held-out text (default 8)")
    parser.add_argument("--tokens", type=int, default=128, help="tokens per window (default 128)")
    parser.add_argument("--report", required=True, help="the JSON report")
    parser.add_argument("--page", default=None, help="the HTML page")
    parser.add_argument("--plot", default=None, help="the PNG plot")
    args = parser.parse_args(argv)
    exports = dict(args.export)
    adapters = dict(args.adapter)
    if len(exports) != len(args.export) or len(adapters) != len(args.adapter):
        parser.error("each precision takes one --export, each adapter one --adapter")
    if args.samples < 1 or args.tokens < 2:
        parser.error("--samples must be at least 1 and --tokens at least 2")
    return run_cli(
        lambda: accuracy_report(
            exports,
            args.model_dir,
            report=args.report,
            page=args.page,
            plot=args.plot,
            model=args.model,
            dataset=args.dataset,
            samples=args.samples,
            tokens=args.tokens,
            adapters=adapters,
        )
    )


if __name__ == "__main__":
    raise SystemExit(main())
