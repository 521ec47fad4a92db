"""``drllm train``: routers from the paths found by ``drllm search``, knobs chosen on a dev part; with ``--budget``,
budget routers from damage measured on task items (:func:`drllm.eval.budget_selection.select_budget_routers`)."""

from __future__ import annotations

import argparse

from ..eval.report import budget_selection_lines, format_table, selection_lines
from ..tasks.data import TASKS
from .common import (UsageError, add_data_args, add_json_arg, add_model_args, budget_list, lam_value,
                     load_model_from_args, non_negative_int, positive_int, write_json_atomic)

# Options that are TrainConfig fields: left out, they take its defaults (read when training starts, not to build
# the parser, which must not import torch).
CONFIG_OPTIONS = ("epochs", "min_block_labels", "batch_size", "lr", "weight_decay", "warmup_ratio", "gamma", "beta",
                  "dev_fraction", "seed", "num_windows", "extract_batch_size", "cache_dtype")
# Options of the paper's routers only, and of budget routers only (--budget): the other mode refuses them. Their
# defaults are None, so a given one is told apart; budget routers' defaults: drllm.eval.budget_selection.BudgetSettings.
PAPER_ONLY = ("paths", "skips", "min_margin", "lam", "min_block_labels", "batch_size", "lr", "weight_decay",
              "warmup_ratio", "gamma", "beta", "num_windows", "extract_batch_size", "cache_dir", "cache_dtype", "limit")
BUDGET_ONLY = ("task", "split", "n", "budgets", "tap", "vocabulary_size", "vocabulary_items", "allowed", "resamples",
               "data_dir")
# BudgetSettings fields set by an option of the same name (the rest keep their defaults)
BUDGET_OPTIONS = ("budgets", "tap", "vocabulary_size", "vocabulary_items", "allowed", "resamples", "dev_fraction", "seed",
                  "epochs")


def margin_value(text: str) -> float:
    """argparse type: a margin, a number >= 0."""
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("train", help="train routers on searched paths (teacher forcing, cached features)",
                              description="The searched items are split into a train and a dev part; routers are "
                              "trained on the train part once per --min-margin, and the margin, lambda and epoch are "
                              "chosen on the dev part (drllm.eval.selection.select_routers). Hyper-parameters left "
                              "out take the defaults of drllm.train.TrainConfig (AdamW on a focal loss; see its "
                              "docstring).")
    add_model_args(p)
    p.add_argument("--paths", default=None,
                   help="JSONL written by `drllm search` (required, except with --budget, which refuses it)")
    p.add_argument("--skips", default=None, metavar="FILE",
                   help="skip probes from `drllm search --probe-skips`: items without a decisive path teach "
                        "the single-block skip the train part's probed items share, where their own probe allows")
    p.add_argument("--out", required=True,
                   help="output folder: the chosen routers, selection.json, candidates/, cache/")
    p.add_argument("--epochs", type=positive_int, default=None, help="passes over the training examples")
    p.add_argument("--min-margin", type=margin_value, nargs="+", default=None, metavar="M",
                   help="learn a searched path only if the gold answer wins by this normalised log-likelihood "
                        "margin (0: every correct path); records without one teach the default path. Several "
                        "values: the one with the best dev accuracy (default: 0.1 0.2 0.4)")
    p.add_argument("--lam", type=lam_value, nargs="+", default=None, metavar="LAMBDA",
                   help="control knob values to choose from on the dev part (default: -0.25 0 0.25)")
    p.add_argument("--dev-fraction", type=float, default=None,
                   help="share of the searched items held out as the dev part (default 0.2)")
    p.add_argument("--min-block-labels", type=int, default=None,
                   help="learn a skip or repeat at a block only when at least this many train items teach it "
                        "there; fewer teach execute (default 8)")
    p.add_argument("--batch-size", type=positive_int, default=None, help="examples per optimisation step")
    p.add_argument("--lr", type=float, default=None, help="AdamW peak learning rate")
    p.add_argument("--weight-decay", type=float, default=None, help="AdamW weight decay")
    p.add_argument("--warmup-ratio", type=float, default=None, help="share of steps in linear warmup")
    p.add_argument("--gamma", type=float, default=None, help="focal loss exponent")
    p.add_argument("--beta", type=float, default=None, help="effective-number class weights")
    p.add_argument("--seed", type=int, default=None, help="seed of the dev split, initialisation and shuffling")
    p.add_argument("--num-windows", type=positive_int, default=None, help="pooling windows per prompt")
    p.add_argument("--extract-batch-size", type=positive_int, default=None,
                   help="prompts per base-model forward when computing features")
    p.add_argument("--cache-dir", default=None, help="feature cache folder (default: OUT/cache)")
    p.add_argument("--cache-dtype", default=None, choices=["float16", "float32"],
                   help="how the cached features are stored")
    p.add_argument("--limit", type=positive_int, default=None, help="use the first N records")
    p.add_argument("--no-resume", action="store_true", help="start over even if OUT holds a checkpoint")
    budget = p.add_argument_group(
        "budget routers (--budget)",
        "One router reads the prompt once, at block --tap, and picks the K blocks each row skips. The damage of "
        "skips is measured on --task items (no search), both heads (per-block scores, a vocabulary of skip sets) "
        "and both targets (gold margin, label-free KL) are trained on a train part and compared on a dev part "
        "(--dev-fraction, --seed, --epochs as above: defaults 0.2, 0, 200)")
    budget.add_argument("--budget", action="store_true",
                        help="train budget routers instead of the paper's per-block routers (no --paths)")
    budget.add_argument("--task", default=None, choices=TASKS,
                        help="multiple-choice task whose items teach the damage (default: arc_easy)")
    budget.add_argument("--split", default=None, help="split of --task the items come from (default: train)")
    budget.add_argument("--n", type=positive_int, default=None, help="use the first N items (default: all)")
    budget.add_argument("--budgets", type=budget_list, default=None, metavar="K[,K...]",
                        help="blocks skipped per row the routers are built and compared for (default: 1,2,4,6,8)")
    budget.add_argument("--tap", type=non_negative_int, default=None,
                        help="the router reads the hidden state entering this block; blocks before it always run "
                             "(default: 2)")
    budget.add_argument("--vocabulary-size", type=positive_int, default=None,
                        help="skip sets per budget the head 'sets' chooses among (default: 3)")
    budget.add_argument("--vocabulary-items", type=positive_int, default=None,
                        help="train items the vocabulary is chosen greedily on (default: 80)")
    budget.add_argument("--allowed", type=positive_int, default=None,
                        help="blocks the vocabulary may skip: the least damaging single skips (default: 10)")
    budget.add_argument("--resamples", type=non_negative_int, default=None,
                        help="also retrain the chosen head and target on N bootstrap resamples of the train and dev "
                             "parts, kept in OUT/resampled/ (drllm eval reports their mean and spread beside "
                             "static-resampled's; default: 3, 0: none)")
    add_data_args(budget)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_json_arg(p)
    p.set_defaults(run=run)


def run(args) -> int:
    named = lambda names: [f"--{n.replace('_', '-')}" for n in names if getattr(args, n) is not None]  # noqa: E731
    if args.budget:
        refused = named(PAPER_ONLY) + (["--no-resume"] if args.no_resume else [])
        if refused:
            raise UsageError(f"{', '.join(refused)}: not an option of budget routers (--budget measures its own "
                             "damage on --task items; leave them out)")
        return run_budget(args)
    if named(BUDGET_ONLY):
        raise UsageError(f"{', '.join(named(BUDGET_ONLY))}: options of budget routers: add --budget")
    if args.paths is None:
        raise UsageError("the following arguments are required: --paths (or --budget for budget routers)")
    from ..eval.selection import LAMS, MARGINS, select_routers
    from ..train import CLASS_NAMES, TrainConfig

    given = {name: getattr(args, name) for name in CONFIG_OPTIONS if getattr(args, name) is not None}
    config = TrainConfig(**given, cache_dir=args.cache_dir, limit=args.limit, resume=not args.no_resume,
                         progress=not args.no_progress)
    model, tokenizer = load_model_from_args(args)
    selection = select_routers(model, tokenizer, args.paths, args.out, config=config,
                               margins=args.min_margin or MARGINS, lams=args.lam or LAMS, skips_file=args.skips)
    result = selection["run"]
    ex = result["extract"]
    if result["shared_skip"] is not None:
        print(f"shared skip from the train part's probes: block {result['shared_skip']} "
              f"({result['shared_labels']} examples teach it)")
    print(f"{result['records']} examples ({result['default_labels']} teach the default path, "
          f"{result['thin_labels']} thin block decisions taught as execute): {result['train']} train, "
          f"{result['dev']} dev (seed {selection['seed']}); features {ex['computed']} computed, "
          f"{ex['cached']} cached, {ex['seconds']:.1f} s; training {result['train_seconds']:.1f} s")
    print("\n" + selection_lines(selection))
    final = result["final"]
    split = "dev" if final["dev"] else "train"
    m = final[split]
    print(f"\nepoch {final['epoch']} ({split}): accuracy {m['accuracy']:.3f}, macro F1 {m['macro_f1']:.3f}, "
          f"mean path length {m['mean_pred_length']:.2f} (labels {m['mean_label_length']:.2f})")
    print(format_table(["class", "precision", "recall", "F1", "support", "class weight"],
                       [[c, f"{m['per_class'][c]['precision']:.3f}", f"{m['per_class'][c]['recall']:.3f}",
                         f"{m['per_class'][c]['f1']:.3f}", m["per_class"][c]["support"],
                         f"{result['class_weights'][c]:.3f}"] for c in CLASS_NAMES]))
    acc = m["per_layer_accuracy"]
    print("\nper-layer accuracy: " + " ".join(f"{a:.2f}" for a in acc))
    print(f"routers written to {args.out}")
    if args.json:
        write_json_atomic(args.json, selection)
    return 0


def run_budget(args) -> int:
    """``drllm train --budget``: every input checked before the model loads, then
    :func:`~drllm.eval.budget_selection.select_budget_routers`."""
    from ..eval.baselines import BaselineError
    from ..eval.budget_selection import BudgetSettings, select_budget_routers
    from ..routing.budget import BudgetRouters
    from ..tasks import ARC_TASKS, load_task
    from ..train import split_dev

    given = {name: getattr(args, name) for name in BUDGET_OPTIONS if getattr(args, name) is not None}
    settings = BudgetSettings(**{**given, "budgets": tuple(given.get("budgets", BudgetSettings.budgets))})
    task = args.task or "arc_easy"
    if task not in ARC_TASKS:
        raise UsageError(f"--budget measures damage on the answer choices: give a multiple-choice task "
                         f"({', '.join(ARC_TASKS)}), not {task}")
    if not 0 < settings.dev_fraction < 1:
        raise UsageError(f"--dev-fraction must be in (0, 1): budget routers are chosen on a dev part, "
                         f"got {settings.dev_fraction}")
    if max(settings.budgets) > settings.allowed:
        raise UsageError(f"--budgets {','.join(map(str, settings.budgets))}: the vocabulary skips only the "
                         f"--allowed {settings.allowed} least damaging blocks; ask budgets up to {settings.allowed} "
                         "or raise --allowed")
    examples = load_task(task, args.split or "train", data_dir=args.data_dir, limit=args.n)
    train, dev = split_dev(len(examples), settings.dev_fraction, settings.seed)
    if not train or not dev:
        raise UsageError(f"{len(examples)} items with --dev-fraction {settings.dev_fraction} leave an empty train "
                         "or dev part: give more items (--n) or another --dev-fraction")
    model, tokenizer = load_model_from_args(args)
    try:  # the tap and the largest budget, against the model's blocks (as the routers will check them)
        most = BudgetRouters.for_model(model, tap=settings.tap).most_skips()
    except ValueError as err:
        raise UsageError(f"--tap {settings.tap}: {err}") from None
    if max(settings.budgets) > most:
        raise UsageError(f"--budgets {','.join(map(str, settings.budgets))}: the blocks from --tap {settings.tap} on "
                         f"allow at most {most} skips per row (at most 2 in a row); ask budgets up to {most} or "
                         "lower --tap")
    try:
        selection = select_budget_routers(model, tokenizer, examples, args.out, settings=settings,
                                          progress=not args.no_progress)
    except BaselineError as err:  # a vocabulary set the allowed blocks cannot make under the skip-run limit
        raise UsageError(f"{err} (raise --allowed, or ask smaller --budgets)") from None
    print("\n" + budget_selection_lines(selection))
    print(f"budget routers written to {args.out} (label-free: {args.out}/label-free; both route at budget "
          f"{selection['budget']} unless given another; retrains on resamples: {args.out}/resampled)")
    if args.json:
        write_json_atomic(args.json, selection)
    return 0
