"""Suite ``policy``: passes that only some rows take, run by gathering those rows against running every row and
selecting (the runtime's row policy, :mod:`drllm.runtime.plan`), to place the crossover."""

from __future__ import annotations

import contextlib

import torch

from ..runtime.plan import restore_row_policy, set_row_policy
from .config import BenchConfig
from .timing import interleaved, variant
from .workload import generate_exactly, random_tokens, routed


def policy_paths(batch: int, num_blocks: int, fraction: float) -> torch.Tensor:
    """Paths where ``round(fraction * batch)`` rows execute every block and the others skip the even blocks."""
    active = min(batch - 1, max(1, round(fraction * batch)))
    paths = torch.ones(batch, num_blocks, dtype=torch.int64)
    paths[active:, 0::2] = 0
    return paths


def bench_policy(model, cfg: BenchConfig, log=print) -> list[dict]:
    """Gather/scatter against run-all-and-select for passes some rows take."""
    device = model.device
    L = model.config.num_hidden_layers
    n = cfg.policy_tokens
    rows = []

    @contextlib.contextmanager
    def policy(name, paths):
        previous = set_row_policy(name)
        try:
            with routed(model, paths):
                yield
        finally:
            restore_row_policy(previous)

    for B in cfg.policy_batches:
        ids = random_tokens(model, B, cfg.prompt_length, cfg.seed + 7 * B)
        for f in cfg.policy_fractions:
            paths = policy_paths(B, L, f)
            gen = lambda ids=ids: generate_exactly(model, ids, n)  # noqa: E731
            res = interleaved({
                "gather": variant(gen, lambda paths=paths: policy("gather", paths)),
                "select": variant(gen, lambda paths=paths: policy("select", paths)),
            }, cfg.repeats, device, cfg.warmup)
            gt, st = res["gather"]["median"], res["select"]["median"]
            partial = len(range(0, L, 2))
            row = {"batch": B, "active_fraction": float((paths[:, 0] >= 1).double().mean()), "partial_blocks": partial,
                   "gather_ms": 1e3 * gt, "select_ms": 1e3 * st, "select_vs_gather": st / gt,
                   "per_pass_us": 1e6 * (st - gt) / (partial * (n + 1)),
                   "samples": {k: x["all"] for k, x in res.items()}}
            rows.append(row)
            log(f"  policy B={B} active={row['active_fraction']:.2f}: select/gather x{row['select_vs_gather']:.3f} "
                f"({row['per_pass_us']:+.1f} us per partial pass)")
    return rows


def crossover(policy_rows: list[dict]) -> dict:
    """Per batch size, the smallest active fraction from which selecting was not slower than gathering."""
    out = {}
    for B in sorted({r["batch"] for r in policy_rows}):
        rows = sorted((r for r in policy_rows if r["batch"] == B), key=lambda r: r["active_fraction"])
        # The crossover: every measured fraction from it upwards favours selecting.
        frac = None
        for r in reversed(rows):
            if r["select_vs_gather"] <= 1.0:
                frac = r["active_fraction"]
            else:
                break
        out[str(B)] = frac
    return out
