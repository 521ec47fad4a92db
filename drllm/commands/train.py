"""``drllm train``: routers from the paths found by ``drllm search``, knobs chosen on a dev part."""

from __future__ import annotations

import argparse

from ..eval.report import format_table, selection_lines
from .common import add_json_arg, add_model_args, lam_value, load_model_from_args, positive_int, write_json_atomic

# Options that are TrainConfig fields: left out, they take its defaults (read when training starts, not to build
# the parser, which must not import torch).
CONFIG_OPTIONS = ("epochs", "min_block_labels", "batch_size", "lr", "weight_decay", "warmup_ratio", "gamma", "beta",
                  "dev_fraction", "seed", "num_windows", "extract_batch_size", "cache_dtype")


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
    p.add_argument("--paths", required=True, help="JSONL written by `drllm search`")
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
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_json_arg(p)
    p.set_defaults(run=run)


def run(args) -> int:
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
