"""``drllm demo``: the whole pipeline on the embedded model and ARC-Easy."""

from __future__ import annotations

import argparse
import dataclasses

from ..demo import DEFAULT, QUICK
from ..eval.report import budget_selection_lines, selection_lines
from ..models import cache_dir
from .common import (add_data_args, add_device_arg, add_json_arg, budget_list, lam_value, non_negative_int,
                     positive_int, write_json_atomic)
from .train import margin_value


def default_out(quick: bool) -> str:
    """Outside any checkout, one folder per size: a stage resumes only from a run of its own settings."""
    return str(cache_dir() / ("demo-quick" if quick else "demo"))


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "demo", help="search, train and evaluate routers and budget routers on ARC-Easy, against baselines "
                     "(the embedded model)",
        description="Runs offline on the embedded SmolLM2-135M-Instruct and the ARC-Easy items shipped with drllm. "
        "Each stage writes to the output folder and a rerun resumes from it.",
    )
    p.add_argument("--quick", action="store_true", help="a small run (about a minute on a 2-core CPU)")
    p.add_argument("--out", default=None,
                   help="output folder: paths, routers, report, figures (default: $DRLLM_CACHE/demo, or demo-quick "
                        "with --quick; $DRLLM_CACHE defaults to ~/.cache/drllm)")
    p.add_argument("--model", default=None, help="base model (default: the embedded SmolLM2-135M-Instruct)")
    add_device_arg(p)
    p.add_argument("--n-search", type=positive_int, default=None,
                   help=f"train items to search (default {DEFAULT.n_search}, or {QUICK.n_search} with --quick)")
    p.add_argument("--simulations", type=positive_int, default=None,
                   help=f"MCTS simulations per item (default {DEFAULT.simulations}, "
                        f"or {QUICK.simulations} with --quick)")
    p.add_argument("--n-eval", type=positive_int, default=None,
                   help=f"validation items of each split (default {DEFAULT.n_eval}, or {QUICK.n_eval} with --quick)")
    p.add_argument("--epochs", type=positive_int, default=None,
                   help=f"router training epochs (default {DEFAULT.epochs})")
    p.add_argument("--seed", type=int, default=None,
                   help=f"seed of the search and the training (default {DEFAULT.seed})")
    p.add_argument("--min-margin", type=margin_value, default=None,
                   help="learn a searched path only if the gold answer wins by this margin (see drllm train; "
                        "default: chosen on the dev part of the searched items)")
    p.add_argument("--lam", type=lam_value, default=None,
                   help="control knob of the routers (default: chosen on the dev part of the searched items)")
    p.add_argument("--ks", type=positive_int, nargs="+", default=None,
                   help=f"blocks each baseline drops (default {' '.join(map(str, DEFAULT.ks))}, or "
                        f"{' '.join(map(str, QUICK.ks))} with --quick)")
    p.add_argument("--seeds", type=positive_int, default=None,
                   help=f"random baseline: skip sets drawn per K (default {DEFAULT.seeds}, or {QUICK.seeds} "
                        "with --quick)")
    p.add_argument("--budgets", type=budget_list, default=None, metavar="K[,K...]",
                   help=f"blocks the budget routers skip per row, the baselines too (default "
                        f"{','.join(map(str, DEFAULT.budgets))}, or {','.join(map(str, QUICK.budgets))} with --quick)")
    p.add_argument("--budget-items", type=positive_int, default=None,
                   help="ARC-Easy train items the budget routers learn from (default: the searched items, --n-search)")
    p.add_argument("--resamples", type=non_negative_int, default=None,
                   help=f"static selection repeated on N bootstrap resamples of the dev part (default "
                        f"{DEFAULT.resamples})")
    p.add_argument("--shortlist", type=non_negative_int, default=None,
                   help=f"static: single skips kept after the first greedy step (default {DEFAULT.shortlist}; "
                        "0: every block at every step)")
    p.add_argument("--probe-skips", action=argparse.BooleanOptionalAction, default=None,
                   help="probe every single-block skip on the searched items and teach the one they share "
                        "where no searched path wins (see drllm search --probe-skips)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_data_args(p)
    add_json_arg(p)
    p.set_defaults(run=run)


def run(args) -> int:
    from ..demo import DATASETS, run_demo

    settings = QUICK if args.quick else DEFAULT
    overrides = {k: getattr(args, k) for k in ("n_search", "simulations", "n_eval", "epochs", "seed", "min_margin",
                                                "lam", "probe_skips", "seeds", "budget_items")
                 if getattr(args, k) is not None}
    if args.ks is not None:
        overrides["ks"] = tuple(sorted(set(args.ks)))
    if args.budgets is not None:
        overrides["budgets"] = tuple(args.budgets)
    if args.resamples is not None:
        overrides["resamples"] = args.resamples
    if args.shortlist is not None:
        overrides["shortlist"] = args.shortlist or None
    settings = dataclasses.replace(settings, **overrides)
    out = args.out or default_out(args.quick)
    summary = run_demo(out, settings, model_name=args.model, data_dir=args.data_dir, device=args.device,
                       progress=not args.no_progress)
    print("\n" + selection_lines(summary["selection"]))
    budget = summary["budget"]
    print("\nbudget routers " + budget_selection_lines(budget["selection"]))
    print(f"\nbaselines (shortgpt calibration, static selection): {summary['calibration']}")
    for task, title in DATASETS:
        frontier, versus = summary["tables"][task]
        print(f"\n{title}, {summary['datasets'][task]['n']} items, log-likelihood scoring, "
              f"routers at λ {summary['selection']['lam']:g}, budget routers at K = "
              f"{', '.join(map(str, budget['budgets']))}\n")
        print(frontier + "\n\n" + versus)
    print("\n" + " | ".join(f"{k} {v:.1f} s" for k, v in summary["seconds"].items()))
    print(f"\nreport, routers and figures in {out}")
    if args.json:
        write_json_atomic(args.json, {k: v for k, v in summary.items() if k != "tables"})
    return 0
