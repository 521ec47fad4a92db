"""Suite ``throughput``: generated tokens per second against batch size, on the budget routers' own paths, eager and
compiled, against the union bound. Prompts are validation questions when the model has a tokenizer
(:func:`~drllm.bench.workload.prompt_batch`), so the routers pick as they would in use.

Each row's path is what the budget routers (:func:`~drllm.bench.workload.budget_routers`) pick for its prompt at
the prefill; decode steps then run the rows grouped by path (:mod:`drllm.runtime.grouping`), each group on its
path's whole-step graph when compiled. The bound is the time of a batch that ran only the union of the (block,
pass) pairs some row runs (:func:`~drllm.bench.workload.union_passes`), each at full-batch cost:
``fixed + union / L * (vanilla - fixed)``, with the all-skip path's time as ``fixed``. Eager variants run
transformers' dynamic cache; compiled ones a static cache, vanilla as ``torch.compile(model.forward)``. The
first round is untimed (it compiles); graphs compiled in the timed rounds are counted.
"""

from __future__ import annotations

import contextlib
import copy

import torch

from .compile import compile_options, graphs_compiled
from .config import BenchConfig
from .timing import interleaved, variant
from .workload import budget_routers, generate_exactly, path_statistics, prompt_batch, union_passes, unpatched


@contextlib.contextmanager
def budget_routed(model, routers, budget: int, paths=None):
    """``model`` patched with budget routers at ``budget`` (optionally on forced ``paths``), for the duration."""
    import drllm

    drllm.patch(model, routers, budget=budget)
    try:
        with drllm.forced_paths(model, paths) if paths is not None else contextlib.nullcontext():
            yield model
    finally:
        drllm.unpatch(model)


def bench_throughput(model, cfg: BenchConfig, log=print) -> list[dict]:
    """Tokens/s against batch size on the routers' paths, eager and compiled, with the union bound."""
    import drllm

    device = model.device
    L = model.config.num_hidden_layers
    n = cfg.throughput_tokens
    options = compile_options(cfg)
    routers, budget = budget_routers(model, cfg)
    skip_all = torch.zeros(L, dtype=torch.int64)
    vanilla_c = copy.deepcopy(model)
    vanilla_c.forward = torch.compile(vanilla_c.forward, **options)
    routed_c = drllm.compile(drllm.patch(copy.deepcopy(model), routers, budget=budget), **options)
    rows = []
    try:
        for B in cfg.batch_sizes:
            ids, mask = prompt_batch(model, cfg, B, cfg.seed + B)
            eager = lambda ids=ids, mask=mask: generate_exactly(model, ids, n, mask=mask)  # noqa: E731
            static = lambda m, ids=ids, mask=mask: lambda: generate_exactly(m, ids, n, static=True, mask=mask)  # noqa: E731
            variants = {
                "vanilla eager": variant(eager, lambda: contextlib.nullcontext(unpatched(model))),
                "routed eager": variant(eager, lambda: budget_routed(model, routers, budget)),
                "all-skip eager": variant(eager, lambda: budget_routed(model, routers, budget, skip_all)),
                "vanilla compiled": variant(static(vanilla_c)),
                "routed compiled": variant(static(routed_c)),
                "all-skip compiled": variant(static(routed_c), lambda: drllm.forced_paths(routed_c, skip_all)),
            }
            before = graphs_compiled()
            interleaved(variants, 1, device, warmup=False)  # compiles
            warm = graphs_compiled()
            res = interleaved(variants, cfg.repeats, device, warmup=False)
            after_warmup = graphs_compiled() - warm
            static(routed_c)()
            paths = drllm.last_paths(routed_c)
            union = union_passes(paths)
            tok = B * n
            for mode in ("eager", "compiled"):
                v, r, fixed = (res[f"{k} {mode}"]["median"] for k in ("vanilla", "routed", "all-skip"))
                bound = fixed + union / L * (v - fixed)
                row = {"batch": B, "mode": mode, "vanilla_tok_s": tok / v, "routed_tok_s": tok / r,
                       "bound_tok_s": tok / bound, "routed_vs_vanilla": v / r, "bound_vs_vanilla": v / bound,
                       "share_of_bound": bound / r, "union_passes": union, "num_blocks": L, "budget": budget,
                       "distinct_paths": int(torch.unique(paths, dim=0).shape[0]),
                       "mean_path_length": float(paths.sum(1).double().mean()),
                       **{f"paths_{k}": val for k, val in path_statistics(paths).items()},
                       "graphs_compiled": warm - before, "graphs_after_warmup": after_warmup,
                       "samples": {k: x["all"] for k, x in res.items() if k.endswith(mode)}}
                rows.append(row)
                log(f"  throughput B={B} {mode}: vanilla {row['vanilla_tok_s']:.1f} tok/s, routed "
                    f"{row['routed_tok_s']:.1f} (x{row['routed_vs_vanilla']:.3f}), union bound "
                    f"x{row['bound_vs_vanilla']:.3f} ({union}/{L} passes, {row['distinct_paths']} paths), "
                    f"{100 * row['share_of_bound']:.1f}% of the bound")
    finally:
        del vanilla_c, routed_c
    return rows
