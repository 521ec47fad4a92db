"""``drllm``: search | train | eval | generate | bench | demo."""

from __future__ import annotations

import argparse
import importlib
import sys

# Subcommand modules in drllm.commands, in the order ``--help`` lists them.
COMMANDS = ["search", "train", "eval", "generate", "bench", "demo"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="drllm", description="Dynamic layer routing for frozen HF LLMs")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(f"drllm.commands.{name}").add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args) or 0


if __name__ == "__main__":
    sys.exit(main())
