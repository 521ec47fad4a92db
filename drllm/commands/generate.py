"""``drllm generate``: text from a (routed) model, with the path each prompt took."""

from __future__ import annotations

import contextlib
import time

import torch

from ..paths import path_to_str
from .common import add_json_arg, add_model_args, format_table, load_model_from_args, write_json_atomic


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("generate", help="generate text with routers (or a forced path)")
    add_model_args(p)
    p.add_argument("prompts", nargs="+", help="one or more prompts (a batch)")
    p.add_argument("--routers", default=None, help="router checkpoint folder (default: no routers, vanilla)")
    p.add_argument("--path", default=None, help="force this path for every prompt, e.g. 111011...")
    p.add_argument("--lam", type=float, default=0.0, help="control knob in [-1, 1]: <0 skips more, >0 repeats more")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--no-chat", action="store_true", help="do not wrap prompts in the chat template")
    add_json_arg(p)
    p.set_defaults(run=run)


def run(args) -> int:
    import drllm

    if any(not p.strip() for p in args.prompts):
        raise SystemExit("drllm generate: empty prompt: give non-empty prompt text")
    model, tokenizer = load_model_from_args(args)
    routers = drllm.Routers.from_pretrained(args.routers) if args.routers else None
    drllm.patch(model, routers, lam=args.lam)
    texts = list(args.prompts)
    if tokenizer.chat_template and not args.no_chat:
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": t}], tokenize=False,
                                               add_generation_prompt=True) for t in texts]
    tokenizer.padding_side = "left"
    batch = tokenizer(texts, return_tensors="pt", padding=True).to(model.device)
    forced = drllm.forced_paths(model, drllm.paths.path_from_str(args.path)) if args.path else None
    start = time.perf_counter()
    with torch.no_grad(), forced or contextlib.nullcontext():
        out = model.generate(**batch, max_new_tokens=args.max_new_tokens, do_sample=args.sample,
                             pad_token_id=tokenizer.pad_token_id)
    seconds = time.perf_counter() - start
    paths = drllm.last_paths(model)
    new = out[:, batch["input_ids"].shape[1]:]
    records = []
    L = paths.shape[1]
    for prompt, tokens, path in zip(args.prompts, new, paths):
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        records.append({"prompt": prompt, "text": text, "path": path_to_str(path), "blocks": int(path.sum())})
        print(f"### {prompt}\n{text}\n")
    print(format_table(["prompt", "path", "blocks per pass"],
                       [[r["prompt"][:40], r["path"], f"{r['blocks']}/{L}"] for r in records]))
    print(f"\n{new.numel()} tokens in {seconds:.2f} s")
    if args.json:
        write_json_atomic(args.json, {"results": records, "seconds": seconds, "num_blocks": L})
    return 0

