"""``edgellm-build-engine``: build a TensorRT engine from an exported ONNX directory."""

from __future__ import annotations

import argparse

from edgellm_steps.build_engine import build_engine
from edgellm_steps.cli import run_cli


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="edgellm-build-engine", description=__doc__)
    parser.add_argument("--onnx_dir", required=True)
    parser.add_argument("--engine", required=True, help="engine file to write")
    parser.add_argument("--sm", type=int, required=True, help="SM target, e.g. 87 for Jetson Orin")
    parser.add_argument("--max_batch_size", type=int, default=4)
    parser.add_argument("--max_input_len", type=int, default=1024)
    parser.add_argument("--max_kv_cache_capacity", type=int, default=4096)
    parser.add_argument("--max_lora_rank", type=int, default=0)
    args = parser.parse_args(argv)
    limits = {
        k: getattr(args, k) for k in ("max_batch_size", "max_input_len", "max_kv_cache_capacity", "max_lora_rank")
    }
    return run_cli(lambda: build_engine(args.onnx_dir, args.engine, sm=args.sm, **limits))


if __name__ == "__main__":
    raise SystemExit(main())
