"""``drllm generate``: text from a (routed) model, streamed, with the path each prompt took."""

from __future__ import annotations

import argparse
import contextlib
import time

from ..eval.report import format_table
from .common import (
    UsageError,
    add_json_arg,
    add_model_args,
    check_selection_kind,
    lam_value,
    load_model_from_args,
    load_routers,
    non_negative_int,
    positive_int,
    write_json_atomic,
)


def path_text(text: str) -> str:
    """argparse type: a path as one digit 0/1/2 per block."""
    if not text or set(text) - set("012"):
        raise argparse.ArgumentTypeError(f"use one digit 0 (skip), 1 (execute) or 2 (repeat) per block, got {text!r}")
    return text


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "generate", help="generate text with routers (or a forced path)",
        description="Each prompt's path (routed once, on the prompt) is printed, then its text as it is generated.",
    )
    add_model_args(p)
    p.add_argument("prompts", nargs="+", help="one or more prompts, generated one after the other")
    route = p.add_mutually_exclusive_group()  # a forced path overrides every router decision
    route.add_argument("--routers", default=None, help="router checkpoint folder (default: no routers, vanilla)")
    route.add_argument("--path", default=None, type=path_text, help="force this path for every prompt, e.g. 111011...")
    p.add_argument("--lam", type=lam_value, default=None,
                   help="control knob in [-1, 1]: <0 skips more, >0 repeats more (default: the value `drllm train` "
                        "chose, from the routers' selection.json, else 0)")
    p.add_argument("--budget", type=non_negative_int, default=None,
                   help="budget routers (`drllm train --budget`): blocks each prompt skips, exactly (default: the "
                        "budget `drllm train --budget` chose, from the routers' selection.json)")
    p.add_argument("--max-new-tokens", type=positive_int, default=64, help="tokens to generate per prompt")
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--no-chat", action="store_true", help="do not wrap prompts in the chat template")
    add_json_arg(p)
    p.set_defaults(run=run)


def run(args) -> int:
    import torch

    import drllm
    from ..eval.selection import read_selection, routing_knobs
    from ..paths import path_from_str, path_to_str
    from ..streaming import PathStreamer

    if any(not p.strip() for p in args.prompts):
        raise UsageError("empty prompt: give non-empty prompt text")
    # a bad folder fails before the model loads
    routers = load_routers(args.routers) if args.routers else None
    selection = read_selection(args.routers) if args.routers else None
    by_budget = isinstance(routers, drllm.BudgetRouters)
    check_selection_kind(args.routers, selection, by_budget)
    # the knobs drllm train chose, unless given here
    knobs = routing_knobs(selection, lam=args.lam, budget=args.budget)
    (lam, lam_source), (budget, budget_source) = knobs["lam"], knobs["budget"]
    if by_budget:
        lam = 0.0
        if args.lam is not None:
            raise UsageError("--lam moves the paper's per-block routers; budget routers skip exactly --budget "
                             "blocks per prompt")
        if budget is None:
            raise UsageError(f"{args.routers} holds no selection.json to read the budget from: give --budget K")
        try:
            budget = routers.check_budget(budget)
        except ValueError as err:
            raise UsageError(str(err)) from None
    elif args.budget is not None:
        raise UsageError("--budget needs budget routers (drllm train --budget); "
                         + (f"{args.routers} holds the paper's per-block routers: give --lam" if routers is not None
                            else "give --routers"))
    else:
        budget = None
    model, tokenizer = load_model_from_args(args)
    L = model.config.num_hidden_layers
    if args.path and len(args.path) != L:
        raise UsageError(f"--path has {len(args.path)} digits but the model has {L} blocks")
    try:
        drllm.patch(model, routers, lam=lam, budget=budget)
    except ValueError as err:  # routers trained for another model
        raise UsageError(str(err)) from None
    records, tokens, start = [], 0, time.perf_counter()
    for prompt in args.prompts:
        text = prompt
        if tokenizer.chat_template and not args.no_chat:
            text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                 add_generation_prompt=True)
        inputs = tokenizer(text, return_tensors="pt").to(model.device)
        print(f"### {prompt}", flush=True)
        streamer = PathStreamer(model, tokenizer, skip_special_tokens=True)
        forced = drllm.forced_paths(model, path_from_str(args.path)) if args.path else contextlib.nullcontext()
        with torch.no_grad(), forced:
            out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=args.sample,
                                 pad_token_id=tokenizer.pad_token_id, streamer=streamer)
        new = out[0, inputs["input_ids"].shape[1]:]
        tokens += new.numel()
        records.append({"prompt": prompt, "text": tokenizer.decode(new, skip_special_tokens=True),
                        "path": path_to_str(streamer.path), "blocks": int(streamer.path.sum())})
        print()
    seconds = time.perf_counter() - start
    print(format_table(["prompt", "path", "blocks per pass"],
                       [[r["prompt"][:40], r["path"], f"{r['blocks']}/{L}"] for r in records]))
    if by_budget:
        print(f"\nbudget routers at budget {budget} ({budget_source}): {L - budget} of {L} blocks per pass")
    elif routers is not None:
        print(f"\nrouters at λ {lam:g} ({lam_source})")
    print(f"\n{tokens} tokens in {seconds:.2f} s")
    if args.json:
        write_json_atomic(args.json, {"results": records, "seconds": seconds, "num_blocks": L, "lam": lam,
                                      "budget": budget})
    return 0
