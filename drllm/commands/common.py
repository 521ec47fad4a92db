"""Options and output shared by every subcommand.

Imported to build ``drllm --help``: nothing here may import torch at module level.
"""

from __future__ import annotations

import argparse

from ..artifacts import write_json as write_json_atomic  # noqa: F401 (re-exported for the commands)
from ..models import DEFAULT_MODEL
from ..tasks.data import TASKS


class UsageError(Exception):
    """A mistake in the command line or its inputs: ``drllm`` prints it as one line and exits with status 2."""


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def lam_value(text: str) -> float:
    """argparse type: the control knob, a number in [-1, 1]."""
    value = float(text)
    if not -1.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [-1, 1], got {text}")
    return value


def add_task_arg(parser: argparse.ArgumentParser, default: str = "arc_easy") -> None:
    parser.add_argument("--task", default=default, choices=TASKS, help=f"benchmark (default: {default})")


def add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"hub name or local path of the base model (default: the embedded {DEFAULT_MODEL})",
    )
    add_device_arg(parser)
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="weights dtype (default: float32 on CPU, bfloat16 on CUDA)")


def add_device_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")


def add_data_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data-dir",
        default=None,
        help="folder holding <task>/<split>.jsonl (default: $DRLLM_DATA_DIR, else the copy embedded in drllm "
        "for the splits it holds, else the Hugging Face hub)",
    )


def add_json_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", default=None, metavar="FILE", help="also write the summary figures as JSON")


def load_model_from_args(args):
    """``(model, tokenizer)`` for ``--model/--device/--dtype``."""
    import torch

    from ..models import load_model

    dtype = getattr(torch, args.dtype) if args.dtype else None
    return load_model(args.model, dtype=dtype, device=args.device)
