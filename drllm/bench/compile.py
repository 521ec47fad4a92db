"""Suite ``compile``: compiled routed decoding against the compiled vanilla model (batch 1, static cache).

The routed model is patched with budget routers (:func:`~.workload.budget_routers`) and compiled with
``drllm.compile``: a decode step on one path runs that path's whole-step graph. Fixed paths are the
evenly skipped ones and each path of the routers' vocabulary; "routers" is the routers' own pick.

The vanilla model is compiled the way transformers users already run it
(``model.forward = torch.compile(model.forward)``, static cache: "vanilla"),
and also block by block the plain way ("vanilla (per block)": each block's
forward compiled, given transformers' own cache, whose per-layer index makes
dynamo compile one graph per block; drllm's slot views avoid that). Every variant runs ``generate`` with transformers' own
auto-compilation off, interleaved with the others; a second vanilla variant
gives the run's noise (the spread of vanilla against itself). The first
round is untimed: it compiles, and its extra time is reported as compile time.
"""

from __future__ import annotations

import copy
import statistics

import torch

from ..runtime.state import require_state
from .config import BenchConfig
from .timing import interleaved, self_noise
from .workload import budget_routers, evenly_skipped_path, generate_exactly, prompt_batch, vocabulary


def compile_options(cfg: BenchConfig) -> dict:
    """``torch.compile`` options of the compiled variants: the run's mode and backend."""
    options = {"mode": cfg.compile_mode} if cfg.compile_mode else {}
    return {**options, "backend": cfg.compile_backend} if cfg.compile_backend else options


def per_block(model, options: dict):
    """``model`` whose blocks run compiled on decode steps: plain regional compilation, without routing."""

    def block(layer, hidden_states, *args, **kwargs):
        return type(layer).forward(layer, hidden_states, *args, **kwargs)

    compiled = torch.compile(block, fullgraph=True, **options)

    def forward(layer, eager):
        return lambda h, *a, **k: compiled(layer, h, *a, **k) if h.shape[1] == 1 else eager(h, *a, **k)

    for layer in model.model.layers:
        layer.forward = forward(layer, layer.forward)
    return model


def graphs_compiled() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def bench_compile(model, cfg: BenchConfig, log=print) -> list[dict]:
    """Compiled vanilla vs compiled routed decode: fixed paths, router-decided paths, compile time and graphs."""
    import drllm

    device = model.device
    L = model.config.num_hidden_layers
    n = cfg.compile_tokens
    options = compile_options(cfg)
    ids, mask = prompt_batch(model, cfg, 1, cfg.seed)

    def generate(m):
        return generate_exactly(m, ids, n, static=True, mask=mask)

    vanilla = copy.deepcopy(model)
    vanilla.forward = torch.compile(vanilla.forward, **options)
    regional = per_block(copy.deepcopy(model), options)
    routers, budget = budget_routers(model, cfg)
    routed = drllm.compile(drllm.patch(model, routers, budget=budget), **options)
    paths = {"all-execute": torch.ones(L, dtype=torch.int64), "all-skip": torch.zeros(L, dtype=torch.int64)}
    paths.update({f"skip {k}": evenly_skipped_path(L, k) for k in cfg.skip_counts if k < L})
    paths.update({f"vocabulary {i}": p for i, p in enumerate(vocabulary(routers, budget))})

    def forced(path):
        def setup():
            ctx = drllm.forced_paths(routed, path)
            ctx.__enter__()
            return lambda: generate(routed), lambda: ctx.__exit__(None, None, None)

        return setup

    plain = lambda m: lambda: (lambda: generate(m), lambda: None)  # noqa: E731
    variants = {"vanilla": plain(vanilla), "vanilla (again)": plain(vanilla), "vanilla (per block)": plain(regional),
                "routers": plain(routed)}
    variants.update({name: forced(path) for name, path in paths.items()})
    try:
        before = graphs_compiled()
        first = interleaved(variants, 1, device, warmup=False)  # compiles
        compiled_graphs = graphs_compiled() - before
        res = interleaved(variants, cfg.repeats, device, warmup=False)
        recompiled = graphs_compiled() - before - compiled_graphs
        generate(routed)
        decided = drllm.last_paths(routed)[0]
        compile_seconds = dict(require_state(routed).graphs.compile_seconds)
    finally:
        drllm.unpatch(model)
        del vanilla, regional
    v = res["vanilla"]["median"]
    fixed = res["all-skip"]["median"]
    noise = self_noise(res)
    rows = []
    fixed_paths = [k for k in paths if k.startswith(("skip", "vocabulary"))]
    for name in ["vanilla (again)", "vanilla (per block)", "all-execute", *fixed_paths, "routers"]:
        blocks = int(decided.sum()) if name == "routers" else (L if name.startswith("vanilla") else int(paths[name].sum()))
        ideal = (fixed + blocks / L * (v - fixed)) / v
        t = res[name]["median"]
        row = {"variant": name, "blocks": blocks, "ms": 1e3 * t, "vanilla_ms": 1e3 * v, "fixed_ms": 1e3 * fixed,
               "ratio": t / v, "ideal_ratio": ideal, "of_ideal_speedup": ideal * v / t,
               "compile_s": max(0.0, first[name]["median"] - t), "samples": res[name]["all"]}
        path = decided if name == "routers" else paths.get(name)
        if path is not None:  # the path's whole-step graph: its first call, tracing and compiling
            row["graph_compile_s"] = compile_seconds.get((tuple(path.tolist()), "model"))
        rows.append(row)
        log(f"  compiled {name}: x{row['ratio']:.3f} of compiled vanilla ({1e3 * v / n:.1f} ms/token), blocks {blocks}, "
            f"ideal x{ideal:.3f}, {100 * row['of_ideal_speedup']:.1f}% of ideal speedup")
    summary = {"variant": "summary", "noise": noise, "new_tokens": n, "graphs_compiled": compiled_graphs, "budget": budget,
               "routers": cfg.routers or "stand-in",
               "graphs_after_warmup": recompiled, "decided_path": decided.tolist(),
               "vanilla_compile_s": max(0.0, first["vanilla"]["median"] - v),
               "median_ms": {k: 1e3 * statistics.median(r["all"]) for k, r in res.items()}}
    log(f"  compiled: noise (vanilla vs itself) {100 * noise:.1f}%, {compiled_graphs} graphs compiled, "
        f"{recompiled} after the first round")
    return rows + [summary]
