"""Console scripts: parse arguments, call one library function, map errors to exit codes."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

from edgellm_steps.artifacts.heap import reuse_freed_buffers
from edgellm_steps.errors import EdgeLLMError


def key_value(flag: str, key: str, value: str = "DIR") -> Callable[[str], tuple[str, str]]:
    """An argparse type for ``flag`` taking ``KEY=VALUE`` (both non-empty): one line naming the form otherwise."""

    def parse(text: str) -> tuple[str, str]:
        name, sep, rest = text.partition("=")
        if not sep or not name or not rest:
            raise argparse.ArgumentTypeError(f"{flag} takes {key}={value}, not {text!r}")
        return name, rest

    return parse


def _add_threads(parser: argparse.ArgumentParser, help: str) -> None:
    parser.add_argument("--threads", type=positive_int, default=None, help=help)


def add_threads_argument(parser: argparse.ArgumentParser) -> None:
    """``--threads`` of an export step: threads converting weights while others read and write."""
    _add_threads(
        parser, "threads converting weights while others read and write (default: the cores this process may use)"
    )


def add_torch_threads_argument(parser: argparse.ArgumentParser) -> None:
    """``--threads`` of a torch step (calibrate, quantize, verify); applied by :func:`use_torch_threads`."""
    _add_threads(
        parser, "CPU threads of torch (torch.set_num_threads; default: torch's, i.e. OMP_NUM_THREADS or the cores)"
    )


def use_torch_threads(threads: int | None) -> None:
    """Give torch ``threads`` CPU threads; None leaves torch's own choice."""
    if threads is not None:
        import torch

        torch.set_num_threads(threads)


def positive_int(text: str) -> int:
    """An argparse type: an integer of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is below 1")
    return value


def run_cli(body: Callable[[], object]) -> int:
    """Run ``body`` with logging set up; a user error becomes one line and exit code 2."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        body()
    except EdgeLLMError as err:
        sys.stderr.write(f"error: {err}\n")
        return 2
    return 0


def run_streaming_cli(body: Callable[[], object]) -> int:
    """:func:`run_cli` for a step that streams weights through conversion buffers: freed buffers are reused."""
    reuse_freed_buffers()
    return run_cli(body)
