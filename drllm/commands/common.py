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


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text}")
    return value


def budget_list(text: str) -> list[int]:
    """argparse type: budgets (blocks skipped per row) as ``1,2,4``: distinct integers >= 1, sorted."""
    try:
        values = [int(k) for k in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"write budgets as whole numbers separated by commas, e.g. 1,2,4; "
                                         f"got {text!r}") from None
    if min(values) < 1 or len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"budgets must be distinct integers >= 1, got {text!r}")
    return sorted(values)


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


def load_routers(directory):
    """The routers saved in ``directory``: budget routers (:class:`drllm.BudgetRouters`) where it holds their config,
    else the paper's per-block routers (:class:`drllm.Routers`); either is checked before use."""
    from pathlib import Path

    from ..routing.budget import CONFIG_NAME, BudgetRouters
    from ..routing.routers import Routers

    if (Path(directory) / CONFIG_NAME).is_file():
        return BudgetRouters.from_pretrained(directory)
    return Routers.from_pretrained(directory)


def check_selection_kind(folder, selection, by_budget: bool) -> None:
    """A ``selection.json`` written for the other kind of routers than the folder holds is refused: its knobs do
    not apply to them."""
    if selection is None or (selection.get("kind") == "budget") == by_budget:
        return
    kinds = ("per-block", "budget")
    raise UsageError(f"{folder}/selection.json was written for {kinds[not by_budget]} routers, but {folder} holds "
                     f"{kinds[by_budget]} routers: train them again")


def load_model_from_args(args):
    """``(model, tokenizer)`` for ``--model/--device/--dtype``."""
    import torch

    from ..models import load_model

    dtype = getattr(torch, args.dtype) if args.dtype else None
    return load_model(args.model, dtype=dtype, device=args.device)
