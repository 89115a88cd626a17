"""``edgellm-build-engine``: build the runtime's engine directory for one GPU (SM) target."""

from __future__ import annotations

import argparse
from dataclasses import fields

from edgellm_steps.cli import run_cli
from edgellm_steps.engine.build_engine import build_engine
from edgellm_steps.engine.host import PLUGIN_ENV
from edgellm_steps.engine.limits import BuildLimits


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="edgellm-build-engine", description=__doc__)
    parser.add_argument("--onnx_dir", required=True, help="export directory (model.onnx and sidecars)")
    parser.add_argument("--engine_dir", required=True, help="engine directory to write")
    parser.add_argument("--sm", type=int, required=True, help="SM target, e.g. 87 for Jetson Orin")
    parser.add_argument("--plugin_path", default=None, help=f"Edge-LLM plugin library (default: ${PLUGIN_ENV})")
    parser.add_argument(
        "--visual_engine_dir", default=None, help="a VLM's vision engine directory (same SM), placed in visual/"
    )
    parser.add_argument(
        "--draft_engine_dir", default=None, help="an EAGLE base's draft engine directory (same SM), placed beside it"
    )
    parser.add_argument("--lora", action="store_true", help="build from lora_model.onnx (insert-lora's graph)")
    parser.add_argument(
        "--lora_adapter",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="a process-lora output to link in lora/NAME (repeatable; implies --lora)",
    )
    for limit in fields(BuildLimits):
        default = "the vision tower's" if limit.default is None else limit.default
        parser.add_argument(f"--{limit.name}", type=int, default=limit.default, help=f"(default {default})")
    args = parser.parse_args(argv)
    limits = BuildLimits(**{limit.name: getattr(args, limit.name) for limit in fields(BuildLimits)})
    adapters = dict(entry.split("=", 1) for entry in args.lora_adapter if "=" in entry)
    if len(adapters) != len(args.lora_adapter):
        parser.error("--lora_adapter takes NAME=DIR, once per name")
    return run_cli(
        lambda: build_engine(
            args.onnx_dir,
            args.engine_dir,
            sm=args.sm,
            limits=limits,
            plugin_path=args.plugin_path,
            visual_engine_dir=args.visual_engine_dir,
            draft_engine_dir=args.draft_engine_dir,
            lora=args.lora,
            lora_adapters=adapters,
        )
    )


if __name__ == "__main__":
    raise SystemExit(main())
