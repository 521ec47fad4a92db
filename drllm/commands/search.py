"""``drllm search``: length-aware MCTS over execution paths, one JSONL record per example.

Under ``torchrun`` (``WORLD_SIZE``/``RANK`` set) each rank searches
``examples[rank::world]`` into its own shard file and rank 0 merges the
shards into ``--out`` once all are complete. ``--shard i/n`` does the same by
hand; ``drllm search --merge OUT SHARD...`` merges shard files.

Each output is written by one process at a time and records the settings
that made it (``OUT.settings.json``); a rerun under other settings is
refused before anything is appended, unless ``--overwrite``.
"""

from __future__ import annotations

import os
import sys
import time

from ..eval.report import format_table
from .common import (
    UsageError, add_data_args, add_json_arg, add_model_args, add_task_arg, load_model_from_args,
    positive_int, write_json_atomic,
)


def _shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise UsageError(f"--shard takes i/n (e.g. 0/4), got {text!r}") from None
    if n < 1 or not 0 <= i < n:
        raise UsageError(f"--shard i/n needs 0 <= i < n, got {text!r}")
    return i, n


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("search", help="find skip/execute/repeat paths by length-aware MCTS")
    add_model_args(p)
    add_data_args(p)
    add_task_arg(p)
    p.add_argument("--split", default="train", help="split to search (default: train)")
    p.add_argument("--n", type=positive_int, default=None, help="first N examples of the split (default: all)")
    p.add_argument("--simulations", type=positive_int, default=50, help="MCTS simulations per example")
    p.add_argument("--reward", default="loglik", choices=["loglik", "generate"],
                   help="log-likelihood (cloze, acc_norm) or generation + answer extraction")
    p.add_argument("--out", default="paths.jsonl", help="JSONL output (resumed when it exists)")
    p.add_argument("--overwrite", action="store_true",
                   help="start OUT (and the --probe-skips file) over when they were made with other settings "
                        "(default: refuse, so two experiments never mix in one file)")
    p.add_argument("--shard", default=None, help="i/n: search examples[i::n] into OUT's shard file i")
    p.add_argument("--seed", type=int, default=0, help="seed of the search's random choices")
    p.add_argument("--batch", type=int, default=8, help="candidate paths per batched evaluation")
    p.add_argument("--c", type=float, default=1.8, help="UCB exploration constant")
    p.add_argument("--penalty", type=float, default=3.0, help="length penalty (times length / L)")
    p.add_argument("--epsilon", type=float, default=0.1, help="probability of a random child")
    p.add_argument("--length-cap", type=int, default=None, help="max path length (default 2L)")
    p.add_argument("--no-early-stop", action="store_true",
                   help="do not stop once a correct path shorter than the default is found")
    p.add_argument("--min-margin", type=float, default=0.0,
                   help="loglik: a path wins only if the gold answer leads every other choice by this "
                        "normalised log-likelihood margin (default 0: any correct answer; on ARC-Easy, searching "
                        "with 0 and filtering with `drllm train --min-margin` worked better, see RESULTS.md)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="generation mode")
    p.add_argument("--probe-skips", default=None, metavar="FILE",
                   help="loglik: also record the gold margin with each single block skipped, per example, in "
                        "FILE (resumed when it exists); `drllm train --skips FILE` then teaches the skip the "
                        "items share where no path of their own wins (costs about 1.5x the search)")
    p.add_argument("--merge", nargs="+", default=None, metavar=("OUT", "SHARD"),
                   help="only merge shard files: OUT SHARD [SHARD ...]")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_json_arg(p)
    p.set_defaults(run=run)


def _print_summary(summary: dict, out) -> None:
    rows = [
        ["examples", summary["n"]],
        ["default accuracy", f"{summary['default_accuracy']:.3f}"],
        ["best-path accuracy", f"{summary['best_accuracy']:.3f}"],
        ["mean layers saved / pass", f"{summary['mean_layers_saved']:.2f} of {summary.get('num_blocks', '?')}"],
        ["improved fraction", f"{summary['improved_fraction']:.3f}"],
        ["shorter correct path found", f"{summary['shorter_fraction']:.3f}"],
        ["evaluations", summary["evaluations"]],
        ["evaluations / s", f"{summary['evaluations_per_second']:.2f}"],
    ]
    if "shared_skip" in summary:
        block = summary["shared_skip"]
        rows.append(["shared skip (probe)", "none" if block is None else f"block {block}"])
    print(format_table(["figure", "value"], rows))
    print(f"records: {out}")


def _fail_if_locked(*outputs) -> None:
    """Refuse at once, before the model loads, an output another process is writing (the real lock is
    taken again while writing)."""
    from ..artifacts import exclusive_lock

    for out in outputs:
        if out is not None:
            with exclusive_lock(out):
                pass


def run(args) -> int:
    from ..search import SearchConfig, merge_shards, run_search, shard_path, summarize
    from ..search.run import shard_examples, wait_for_shards

    if args.merge:
        if len(args.merge) < 2:
            raise UsageError("--merge OUT SHARD [SHARD ...]")
        records = merge_shards(args.merge[1:], args.merge[0])
        summary = summarize(records)
        _print_summary(summary, args.merge[0])
        if args.json:
            write_json_atomic(args.json, summary)
        return 0

    from ..tasks import load_task

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if args.shard:
        shard = _shard(args.shard)
    elif world > 1:
        shard = (rank, world)
        if args.device is None:
            import torch

            if torch.cuda.is_available():
                args.device = f"cuda:{int(os.environ.get('LOCAL_RANK', rank)) % torch.cuda.device_count()}"
    else:
        shard = None
    if args.probe_skips and (shard is not None or args.reward != "loglik"):
        raise UsageError("--probe-skips needs --reward loglik and no sharding (probe in one process)")
    examples = load_task(args.task, args.split, data_dir=args.data_dir, limit=args.n)
    if not examples:
        raise UsageError(f"no examples in {args.task}/{args.split}")
    config = SearchConfig(
        simulations=args.simulations, c=args.c, penalty=args.penalty, epsilon=args.epsilon,
        length_cap=args.length_cap, early_stop=not args.no_early_stop, batch=args.batch, seed=args.seed,
        max_new_tokens=args.max_new_tokens, min_margin=args.min_margin,
    )
    out = shard_path(args.out, *shard) if shard else args.out
    _fail_if_locked(out, args.probe_skips)
    model, tokenizer = load_model_from_args(args)
    start = time.perf_counter()
    recorded = {"split": args.split}
    summary = run_search(model, tokenizer, examples, out, config=config, reward=args.reward, shard=shard,
                         progress=not args.no_progress and (sys.stderr.isatty() or shard is None or shard[0] == 0),
                         settings=recorded, overwrite=args.overwrite)
    if args.probe_skips:
        from ..search import block_gains, probe_skips, shared_skip

        probes = probe_skips(model, tokenizer, examples, args.probe_skips, config=config,
                             progress=not args.no_progress, settings=recorded, overwrite=args.overwrite)
        summary["shared_skip"] = shared_skip(probes)
        summary["block_gains"] = block_gains(probes)
    summary["wall_seconds"] = time.perf_counter() - start
    if world > 1 and not args.shard:
        if rank != 0:
            print(f"rank {rank}: {summary['n']} records in {out}")
            return 0
        expected = {str(shard_path(args.out, i, world)): [e.id for e in shard_examples(examples, (i, world))]
                    for i in range(world)}
        wait_for_shards(expected)
        records = merge_shards(list(expected), args.out, ids=[e.id for e in examples])
        summary = {**summarize(records), "wall_seconds": time.perf_counter() - start}
        out = args.out
    summary.update(task=args.task, split=args.split, reward=args.reward, simulations=args.simulations,
                   seed=args.seed, out=str(out))
    _print_summary(summary, out)
    if args.json:
        write_json_atomic(args.json, summary)
    return 0
