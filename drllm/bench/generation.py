"""Suite ``generation``: latency of ``generate`` at batch 1, fixed paths against vanilla and their ideal.

Vanilla is timed against the patched model on the all-execute path (pure
overhead) and on fixed paths skipping k blocks. The all-skip path measures the
fixed cost (embeddings, final norm, head, sampling loop), giving the ideal time
of a path that executes ``n`` of ``L`` blocks: ``fixed + n / L * (vanilla - fixed)``.
"""

from __future__ import annotations

import contextlib

import torch

from .config import BenchConfig
from .timing import interleaved, self_noise, variant
from .workload import evenly_skipped_path, generate_exactly, random_tokens, routed, unpatched


def bench_generation(model, cfg: BenchConfig, log=print) -> list[dict]:
    """Generation latency at batch 1, fixed paths against vanilla and the ideal."""
    device = model.device
    L = model.config.num_hidden_layers
    ids = random_tokens(model, 1, cfg.prompt_length, cfg.seed)
    rows = []
    for n in cfg.gen_tokens:
        gen = lambda n=n: generate_exactly(model, ids, n)  # noqa: E731
        variants = {"vanilla": variant(gen, lambda: contextlib.nullcontext(unpatched(model))),
                    "vanilla (again)": variant(gen, lambda: contextlib.nullcontext(unpatched(model))),
                    "all-execute": variant(gen, lambda: routed(model))}
        ks = [k for k in cfg.skip_counts if k < L]
        for k in ks:
            variants[f"skip {k}"] = variant(gen, lambda k=k: routed(model, evenly_skipped_path(L, k)))
        variants["all-skip"] = variant(gen, lambda: routed(model, torch.zeros(L, dtype=torch.int64)))
        res = interleaved(variants, cfg.repeats, device, cfg.warmup)
        v, fixed = res["vanilla"]["median"], res["all-skip"]["median"]
        noise = self_noise(res)
        for name, k in [("all-execute", 0)] + [(f"skip {k}", k) for k in ks]:
            t = res[name]["median"]
            ideal = (fixed + (L - k) / L * (v - fixed)) / v
            row = {"new_tokens": n, "variant": name, "skipped": k, "blocks": L - k, "ms": 1e3 * t,
                   "vanilla_ms": 1e3 * v, "fixed_ms": 1e3 * fixed, "ratio": t / v, "ideal_ratio": ideal,
                   "of_ideal_speedup": ideal * v / t, "noise": noise, "samples": res[name]["all"]}
            rows.append(row)
            log(f"  generation {n} tokens {name}: x{row['ratio']:.3f} of vanilla ({1e3 * v / n:.1f} ms/token), "
                f"ideal x{ideal:.3f}, {100 * row['of_ideal_speedup']:.1f}% of ideal speedup")
    return rows
