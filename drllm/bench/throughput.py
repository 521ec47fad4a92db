"""Suite ``throughput``: generated tokens per second against batch size, per-row paths with the paper's statistics.

Vanilla, routed, and the bound given by the union of (block, pass) pairs some
row executes (:func:`~drllm.bench.workload.union_passes`).
"""

from __future__ import annotations

import contextlib

import torch

from .config import BenchConfig
from .timing import interleaved, variant
from .workload import generate_exactly, path_statistics, random_tokens, routed, sample_paths, union_passes, unpatched


def bench_throughput(model, cfg: BenchConfig, log=print) -> list[dict]:
    """Tokens/s against batch size, paper-statistics paths, with the union bound."""
    device = model.device
    L = model.config.num_hidden_layers
    g = torch.Generator().manual_seed(cfg.seed)
    n = cfg.throughput_tokens
    rows = []
    for B in cfg.batch_sizes:
        ids = random_tokens(model, B, cfg.prompt_length, cfg.seed + B)
        paths = sample_paths(B, L, generator=g)
        gen = lambda ids=ids: generate_exactly(model, ids, n)  # noqa: E731
        res = interleaved({
            "vanilla": variant(gen, lambda: contextlib.nullcontext(unpatched(model))),
            "routed": variant(gen, lambda paths=paths: routed(model, paths)),
            "all-skip": variant(gen, lambda: routed(model, torch.zeros(L, dtype=torch.int64))),
        }, cfg.repeats, device, cfg.warmup)
        v, r, fixed = (res[k]["median"] for k in ("vanilla", "routed", "all-skip"))
        union = union_passes(paths)
        bound = fixed + union / L * (v - fixed)
        tok = B * n
        row = {"batch": B, "vanilla_tok_s": tok / v, "routed_tok_s": tok / r, "bound_tok_s": tok / bound,
               "routed_vs_vanilla": v / r, "bound_vs_vanilla": v / bound, "union_passes": union,
               "mean_path_length": float(paths.sum(1).double().mean()), "num_blocks": L,
               **{f"paths_{k}": val for k, val in path_statistics(paths).items()},
               "samples": {k: x["all"] for k, x in res.items()}}
        rows.append(row)
        log(f"  throughput B={B}: vanilla {row['vanilla_tok_s']:.1f} tok/s, routed {row['routed_tok_s']:.1f} "
            f"(x{row['routed_vs_vanilla']:.3f}), union bound x{row['bound_vs_vanilla']:.3f} ({union}/{L} passes)")
    return rows
