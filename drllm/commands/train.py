"""``drllm train``: routers from the paths found by ``drllm search``."""

from __future__ import annotations

from .common import add_json_arg, add_model_args, format_table, load_model_from_args, write_json_atomic


def add_parser(subparsers) -> None:
    from ..train import TrainConfig

    d = TrainConfig()
    p = subparsers.add_parser("train", help="train routers on searched paths (teacher forcing, cached features)")
    add_model_args(p)
    p.add_argument("--paths", required=True, help="JSONL written by `drllm search`")
    p.add_argument("--skips", default=None, metavar="FILE",
                   help="skip probes from `drllm search --probe-skips`: items without a decisive path teach "
                        "the single-block skip the probed items share, where their own probe allows")
    p.add_argument("--out", required=True, help="output folder: routers, checkpoints/, cache/, train_metrics.json")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--min-margin", type=float, default=d.min_margin,
                   help="learn a searched path only if the gold answer wins by this normalised log-likelihood "
                        "margin (0: every correct path); records without one teach the default path")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="examples per optimisation step")
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--warmup-ratio", type=float, default=d.warmup_ratio, help="share of steps in linear warmup")
    p.add_argument("--gamma", type=float, default=d.gamma, help="focal loss exponent")
    p.add_argument("--beta", type=float, default=d.beta, help="effective-number class weights")
    p.add_argument("--val-fraction", type=float, default=d.val_fraction)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--num-windows", type=int, default=d.num_windows)
    p.add_argument("--extract-batch-size", type=int, default=d.extract_batch_size,
                   help="prompts per base-model forward when computing features")
    p.add_argument("--cache-dir", default=None, help="feature cache folder (default: OUT/cache)")
    p.add_argument("--cache-dtype", default=d.cache_dtype, choices=["float16", "float32"])
    p.add_argument("--limit", type=int, default=None, help="use the first N records")
    p.add_argument("--no-resume", action="store_true", help="start over even if OUT holds a checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_json_arg(p)
    p.set_defaults(run=run)


def run(args) -> int:
    from ..train import CLASS_NAMES, TrainConfig, train_routers

    config = TrainConfig(
        epochs=args.epochs, min_margin=args.min_margin, batch_size=args.batch_size, lr=args.lr,
        weight_decay=args.weight_decay, warmup_ratio=args.warmup_ratio, gamma=args.gamma, beta=args.beta,
        val_fraction=args.val_fraction, seed=args.seed, num_windows=args.num_windows,
        extract_batch_size=args.extract_batch_size,
        cache_dir=args.cache_dir, cache_dtype=args.cache_dtype, limit=args.limit, resume=not args.no_resume,
        progress=not args.no_progress,
    )
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
