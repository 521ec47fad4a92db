"""``drllm train``: routers from the paths found by ``drllm search``."""

from __future__ import annotations

from .common import (
    add_json_arg, add_model_args, format_table, load_model_from_args, positive_int, refusals_are_user_errors,
    write_json_atomic,
)

# Options that are TrainConfig fields: left out, they take its defaults (read when training starts, not to build
# the parser, which must not import torch).
CONFIG_OPTIONS = ("epochs", "min_margin", "batch_size", "lr", "weight_decay", "warmup_ratio", "gamma", "beta",
                  "val_fraction", "seed", "num_windows", "extract_batch_size", "cache_dtype")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("train", help="train routers on searched paths (teacher forcing, cached features)",
                              description="Hyper-parameters left out take the defaults of drllm.train.TrainConfig "
                              "(AdamW on a focal loss; see its docstring).")
    add_model_args(p)
    p.add_argument("--paths", required=True, help="JSONL written by `drllm search`")
    p.add_argument("--skips", default=None, metavar="FILE",
                   help="skip probes from `drllm search --probe-skips`: items without a decisive path teach "
                        "the single-block skip the probed items share, where their own probe allows")
    p.add_argument("--out", required=True, help="output folder: routers, checkpoints/, cache/, train_metrics.json")
    p.add_argument("--epochs", type=positive_int, default=None, help="passes over the training examples")
    p.add_argument("--min-margin", type=float, default=None,
                   help="learn a searched path only if the gold answer wins by this normalised log-likelihood "
                        "margin (0: every correct path); records without one teach the default path")
    p.add_argument("--batch-size", type=positive_int, default=None, help="examples per optimisation step")
    p.add_argument("--lr", type=float, default=None, help="AdamW peak learning rate")
    p.add_argument("--weight-decay", type=float, default=None, help="AdamW weight decay")
    p.add_argument("--warmup-ratio", type=float, default=None, help="share of steps in linear warmup")
    p.add_argument("--gamma", type=float, default=None, help="focal loss exponent")
    p.add_argument("--beta", type=float, default=None, help="effective-number class weights")
    p.add_argument("--val-fraction", type=float, default=None, help="share of examples held out for validation")
    p.add_argument("--seed", type=int, default=None, help="seed of initialisation, split and shuffling")
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


@refusals_are_user_errors
def run(args) -> int:
    from ..train import CLASS_NAMES, TrainConfig, train_routers

    given = {name: getattr(args, name) for name in CONFIG_OPTIONS if getattr(args, name) is not None}
    config = TrainConfig(**given, cache_dir=args.cache_dir, limit=args.limit, resume=not args.no_resume,
                         progress=not args.no_progress)
    model, tokenizer = load_model_from_args(args)
    result = train_routers(model, tokenizer, args.paths, args.out, config=config, skips_file=args.skips)
    ex = result["extract"]
    if result["shared_skip"] is not None:
        print(f"shared skip from the probes: block {result['shared_skip']} "
              f"({result['shared_labels']} examples teach it)")
    print(f"{result['records']} examples ({result['default_labels']} teach the default path): "
          f"{result['train']} train, {result['val']} validation; features {ex['computed']} computed, "
          f"{ex['cached']} cached, {ex['seconds']:.1f} s; training {result['train_seconds']:.1f} s")
    final = result["final"]
    split = "val" if final["val"] else "train"
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
        write_json_atomic(args.json, result)
    return 0
