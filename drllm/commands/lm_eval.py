"""``drllm lm-eval ARGS...``: lm-evaluation-harness's own command line, with the model type ``drllm`` registered.

lm-eval has no plugin entry point, so ``lm_eval --model drllm`` cannot find
drllm's model. This command registers it (``drllm.integrations.lm_eval``) and
hands every argument after ``lm-eval`` to lm-eval's command line unchanged.
"""

from __future__ import annotations

import argparse
import sys

from .common import UsageError

EXAMPLE = ("drllm lm-eval --model drllm --model_args pretrained=PATH,routers=DIR,lam=0.0 "
           "--tasks arc_easy --batch_size 8")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "lm-eval", help="run lm-evaluation-harness's command line with the model type drllm registered",
        description=f"Every argument goes to lm-eval unchanged, e.g. {EXAMPLE}. model_args of drllm: pretrained "
        "(hub name or local path; default the embedded model), routers (a router checkpoint folder; without it "
        "every block runs once), lam, tokenizer, dtype. `drllm lm-eval --help` shows lm-eval's own options.",
        prefix_chars="\0", add_help=False,  # no option of drllm's own: -h and the rest belong to lm-eval
    )
    p.add_argument("args", nargs=argparse.REMAINDER, help=f"lm-eval's arguments, e.g. {EXAMPLE}")
    p.set_defaults(run=run)


def run(args) -> int:
    try:
        from lm_eval.__main__ import cli_evaluate

        from ..integrations import lm_eval as _registered  # noqa: F401  registers the model type "drllm"
    except ImportError as err:
        raise UsageError(f"{err}") from err
    argv = sys.argv
    sys.argv = ["lm-eval", *args.args]  # lm-eval's command line reads sys.argv
    try:
        cli_evaluate()
    except SystemExit as exit_:  # lm-eval's argparse (usage errors, --help)
        code = exit_.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    finally:
        sys.argv = argv
    return 0
