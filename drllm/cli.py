"""``drllm``: search | train | eval | generate | bench | demo | lm-eval.

Building the parser imports only the light command modules (options and
help); each command imports torch and its implementation inside ``run``, so
``drllm --help`` answers at once. A user's mistake, found by argparse or by a
command before it loads the model, is one line ``drllm CMD: error: ...`` and
exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from .artifacts import ArtifactError
from .commands.common import UsageError
from .tasks.data import DataFormatError, DataUnavailableError

# Subcommand modules in drllm.commands, in the order ``--help`` lists them.
COMMANDS = ["search", "train", "eval", "generate", "bench", "demo", "lm_eval"]
# Refused files (ArtifactError: a locked output, other settings, a corrupt or foreign checkpoint) too.
USER_ERRORS = (UsageError, DataUnavailableError, DataFormatError, ArtifactError)


class Parser(argparse.ArgumentParser):
    """argparse, but an error is the one line ``PROG: error: MESSAGE`` (no usage block)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="drllm", description="Dynamic layer routing for frozen HF LLMs")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"drllm.commands.{name}").add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args) or 0
    except USER_ERRORS as err:
        print(f"drllm {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
