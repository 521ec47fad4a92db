"""``drllm demo``: the whole pipeline on the embedded model and ARC-Easy."""

from __future__ import annotations

import argparse
import dataclasses

from .common import add_data_args, add_json_arg, write_json_atomic


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("demo", help="search, train and evaluate routers on ARC-Easy (the embedded model)")
    p.add_argument("--quick", action="store_true", help="a small run (under 3 minutes on a 2-core CPU)")
    p.add_argument("--out", default="drllm-demo", help="output folder: paths, routers, report, figures")
    p.add_argument("--model", default=None, help="base model (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--device", default=None)
    p.add_argument("--n-search", type=int, default=None, help="train items to search")
    p.add_argument("--simulations", type=int, default=None, help="MCTS simulations per item")
    p.add_argument("--n-eval", type=int, default=None, help="validation items (default: all, or 24 with --quick)")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--min-margin", type=float, default=None,
                   help="learn a searched path only if the gold answer wins by this margin (see drllm train)")
    p.add_argument("--probe-skips", action=argparse.BooleanOptionalAction, default=None,
                   help="probe every single-block skip on the searched items and teach the one they share "
                        "where no searched path wins (see drllm search --probe-skips)")
    p.add_argument("--no-progress", action="store_true")
    add_data_args(p)
    add_json_arg(p)
    p.set_defaults(run=run)


def run(args) -> int:
    from ..demo import DEFAULT, QUICK, run_demo
    from ..tasks import DataUnavailableError

    settings = QUICK if args.quick else DEFAULT
    overrides = {k: getattr(args, k) for k in ("n_search", "simulations", "n_eval", "epochs", "seed", "min_margin",
                                                "probe_skips")
                 if getattr(args, k) is not None}
    settings = dataclasses.replace(settings, **overrides)
    try:
        summary = run_demo(args.out, settings, model_name=args.model, data_dir=args.data_dir, device=args.device,
                           progress=not args.no_progress)
    except DataUnavailableError as err:
        raise SystemExit(f"drllm demo: ARC-Easy data is not available.\n{err}")
    print(f"\nARC-Easy validation, {summary['n_eval']} items, log-likelihood scoring\n")
    print(summary["table"])
    print("\n" + " | ".join(f"{k} {v:.1f} s" for k, v in summary["seconds"].items()))
    print(f"\nrouters: {summary['routers']}\nreport: {args.out}/report.md\nfigures: {', '.join(summary['figures'])}")
    if args.json:
        write_json_atomic(args.json, {k: v for k, v in summary.items() if k != "table"})
    return 0
