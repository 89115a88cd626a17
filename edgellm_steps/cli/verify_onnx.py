"""``edgellm-verify-onnx``: check an LLM or vision encoder export against its checkpoint, on the CPU."""

from __future__ import annotations

import argparse

from edgellm_steps.cli import add_torch_threads_argument, run_cli, use_torch_threads
from edgellm_steps.verify.verify_onnx import verify_onnx


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="edgellm-verify-onnx", description=__doc__)
    parser.add_argument("--onnx_dir", required=True, help="export directory (model.onnx and sidecars)")
    parser.add_argument("--model_dir", required=True, help="the HF checkpoint it was exported from (or hub id)")
    parser.add_argument("--prefill", type=int, default=7, help="prompt tokens (default 7)")
    parser.add_argument("--decode", type=int, default=3, help="decode steps after the prompt (default 3)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random tokens")
    parser.add_argument("--report", default=None, help="write the JSON report here")
    parser.add_argument(
        "--adapter", default=None, help="a PEFT LoRA adapter: run lora_model.onnx with it, against PEFT's model"
    )
    add_torch_threads_argument(parser)
    args = parser.parse_args(argv)
    use_torch_threads(args.threads)
    return run_cli(
        lambda: verify_onnx(
            args.onnx_dir,
            args.model_dir,
            prefill=args.prefill,
            decode=args.decode,
            seed=args.seed,
            report=args.report,
            adapter=args.adapter,
        )
    )


if __name__ == "__main__":
    raise SystemExit(main())
