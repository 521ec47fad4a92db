"""Suite ``grouping``: rows of a second path run as a group of their own against running with the other rows in
the shared executor (gather/scatter), to place the crossover of the grouping policy (:mod:`drllm.runtime.grouping`)."""

from __future__ import annotations

import contextlib

import torch

from ..runtime.grouping import restore_group_policy, set_group_policy
from .config import BenchConfig
from .timing import interleaved, variant
from .workload import evenly_skipped_path, generate_exactly, random_tokens, routed


def bench_grouping(model, cfg: BenchConfig, log=print) -> list[dict]:
    """At batch ``cfg.grouping_batch``, ``m`` rows skip 3 blocks and the others run every block: grouped or not."""
    device = model.device
    L = model.config.num_hidden_layers
    B, n = cfg.grouping_batch, cfg.policy_tokens
    ids = random_tokens(model, B, cfg.prompt_length, cfg.seed + 11)

    @contextlib.contextmanager
    def grouping(enabled: bool, paths):
        previous = set_group_policy(enabled=enabled, min_rows=1)
        try:
            with routed(model, paths):
                yield
        finally:
            restore_group_policy(previous)

    rows = []
    for m in (m for m in cfg.grouping_rows if 0 < m < B):
        paths = torch.ones(B, L, dtype=torch.int64)
        paths[B - m:] = evenly_skipped_path(L, min(3, L - 1))
        gen = lambda: generate_exactly(model, ids, n)  # noqa: E731
        res = interleaved({"grouped": variant(gen, lambda paths=paths: grouping(True, paths)),
                           "shared": variant(gen, lambda paths=paths: grouping(False, paths))},
                          cfg.repeats, device, cfg.warmup)
        g, s = res["grouped"]["median"], res["shared"]["median"]
        row = {"batch": B, "rows": m, "grouped_ms": 1e3 * g, "shared_ms": 1e3 * s, "grouped_vs_shared": g / s,
               "samples": {k: x["all"] for k, x in res.items()}}
        rows.append(row)
        log(f"  grouping B={B}, {m} rows on a second path: grouped/shared x{row['grouped_vs_shared']:.3f}")
    return rows


def group_crossover(rows: list[dict]) -> int | None:
    """The fewest rows from which a path's own group was never slower than the shared executor (None: never)."""
    rows = sorted(rows, key=lambda r: r["rows"])
    found = None
    for r in reversed(rows):
        if r["grouped_vs_shared"] > 1.0:
            break
        found = r["rows"]
    return found
