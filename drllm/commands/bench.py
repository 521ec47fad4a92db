"""``drllm bench``: routing overhead, decode latency, throughput and the row policy, against vanilla."""

from __future__ import annotations

import sys

from ..eval.report import format_table
from ..tasks.data import TASKS
from .common import UsageError, add_json_arg, add_model_args, load_model_from_args, write_json_atomic

RANDOM_PREFIX = "random:"


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "bench",
        help="time the routed runtime against the vanilla model (ratios measured in the same run)",
        description="Suites: routing (routers vs prefill), generation (batch-1 latency of fixed paths vs vanilla "
        "and the ideal), throughput (tokens/s vs batch size on the budget routers' paths, eager and compiled, union "
        "bound), policy (gather/scatter vs run-all-and-select), grouping (a path's rows as their own group vs the "
        "shared executor), compile (whole-step graphs per path vs compiled vanilla), kernels "
        "(row ops and pooling vs copy bandwidth). --json also states every target next to its value. --model random:llama-3.2-3b / random:llama-3.1-8b / random:tiny "
        "builds a random-weight Llama of that configuration.",
    )
    add_model_args(p)
    p.add_argument("--quick", action="store_true", help="small sizes (a few minutes on a 2-core CPU)")
    p.add_argument("--suites", default=None,
                   help="comma-separated subset of routing,generation,throughput,policy,grouping,compile,kernels "
                   "(default: all)")
    p.add_argument("--routers", default=None, metavar="DIR",
                   help="suites throughput and compile: budget routers (drllm train --budget) whose paths are decoded "
                   "(default: a stand-in with a vocabulary of three evenly spread skip sets)")
    p.add_argument("--budget", type=int, default=None, help="suites throughput and compile: blocks the routers skip")
    p.add_argument("--task", default="arc_easy", choices=TASKS,
                   help="suites throughput and compile: whose questions are the prompts (default: arc_easy)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats of each variant (median taken)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default on the CPU: 1, which keeps timings steady on a shared machine; "
                   "0: torch's default)")
    ints = lambda text: tuple(int(x) for x in text.split(",") if x.strip())  # noqa: E731
    p.add_argument("--prefill-lengths", type=ints, default=None, metavar="T,T,...", help="suite routing: prompt lengths")
    p.add_argument("--gen-tokens", type=ints, default=None, metavar="N,N,...", help="suite generation: new tokens")
    p.add_argument("--batch-sizes", type=ints, default=None, metavar="B,B,...", help="suite throughput: batch sizes")
    p.add_argument("--policy-batches", type=ints, default=None, metavar="B,B,...", help="suite policy: batch sizes")
    p.add_argument("--prompt-length", type=int, default=None, help="suites generation, throughput, policy: prompt tokens")
    p.add_argument("--tokens", type=int, default=None, help="suites throughput and policy: new tokens per run")
    add_json_arg(p)
    p.set_defaults(run=run)


def load(args):
    """``(model, tokenizer path)`` to benchmark: ``random:<config>`` (no tokenizer) or whatever ``--model`` loads."""
    import torch

    if args.model.startswith(RANDOM_PREFIX):
        from ..bench.config import random_model

        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = getattr(torch, args.dtype) if args.dtype else None
        return random_model(args.model[len(RANDOM_PREFIX):], device=device, dtype=dtype), None
    model, tokenizer = load_model_from_args(args)
    return model, tokenizer.name_or_path


def run(args) -> int:
    import torch

    from ..bench import SUITES, device_name, run as run_suites
    from ..bench.config import BenchConfig
    from ..bench.report import tables

    overrides = {"repeats": args.repeats, "prefill_lengths": args.prefill_lengths, "gen_tokens": args.gen_tokens,
                 "batch_sizes": args.batch_sizes, "throughput_tokens": args.tokens, "policy_tokens": args.tokens,
                 "policy_batches": args.policy_batches, "prompt_length": args.prompt_length, "routers": args.routers,
                 "budget": args.budget, "task": args.task}
    if args.suites:
        overrides["suites"] = tuple(s.strip() for s in args.suites.split(",") if s.strip())
        unknown = set(overrides["suites"]) - set(SUITES)
        if unknown:
            raise UsageError(f"unknown suite(s) {', '.join(sorted(unknown))}; choose from {', '.join(SUITES)}")
    model, overrides["tokenizer"] = load(args)
    if model.device.type == "cpu" and args.threads != 0:
        torch.set_num_threads(args.threads or 1)
    cfg = BenchConfig.for_run(args.quick, model.device, **overrides)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    info = f"{args.model} on {device_name(model.device)}, {str(model.dtype).replace('torch.', '')}"
    log(f"drllm bench: {info}{' (quick)' if args.quick else ''}")
    results = run_suites(model, cfg, log=log, model_name=args.model)
    results["info"]["quick"] = bool(args.quick)
    print(f"# drllm bench: {info}; ratios against vanilla measured in the same run (medians of "
          f"{cfg.repeats} interleaved repeats)")
    for title, headers, rows in tables(results):
        print(f"\n## {title}\n")
        print(format_table(headers, rows))
    if "policy_crossover" in results:
        print(f"\nselect-from crossover (active fraction) per batch: {results['policy_crossover']}")
    print(f"\n{results['info']['seconds']:.0f} s")
    if args.json:
        write_json_atomic(args.json, results)
    return 0
