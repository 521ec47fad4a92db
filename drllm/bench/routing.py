"""Suite ``routing``: pooling + routers for every block against one vanilla prefill, and a routed prefill end to end.

The routers always choose "execute", so the routed prefill runs the vanilla
blocks and its ratio is the routing overhead alone.
"""

from __future__ import annotations

import torch

from ..routing.decide import choose
from ..routing.pooling import Pooling
from .config import BenchConfig
from .timing import interleaved, variant
from .workload import random_tokens, routed


def execute_routers(model):
    """Routers of the model's shape that always choose "execute" (full pooling + MLP cost)."""
    import drllm

    routers = drllm.Routers.for_model(model)
    with torch.no_grad():
        for mlp in routers.mlps:
            mlp.fc2.weight.mul_(1e-3)
            mlp.fc2.bias.copy_(torch.tensor([0.0, 50.0, 0.0]))
    return routers


def bench_routing(model, cfg: BenchConfig, log=print) -> list[dict]:
    """Routers for every block vs one prefill, and a routed prefill end to end."""
    device = model.device
    routers = execute_routers(model)
    L, H = model.config.num_hidden_layers, model.config.hidden_size
    rows = []
    for T in cfg.prefill_lengths:
        ids = random_tokens(model, 1, T, cfg.seed + T)
        hidden = torch.randn(1, T, H, device=device, dtype=model.dtype)
        mask = torch.ones(1, T, dtype=torch.long, device=device)

        def prefill():
            with torch.no_grad():
                model(input_ids=ids, use_cache=True)

        def route_all():  # what the executor runs at the prefill: pooling, router MLP and decision per block
            with torch.no_grad():
                pooling = Pooling(routers, mask)
                for i in range(L):
                    choose(pooling.logits(i, hidden), 0.0)

        res = interleaved({
            "vanilla": variant(prefill),
            "routers": variant(route_all),
            "routed": variant(prefill, lambda: routed(model, routers=routers)),
        }, cfg.repeats, device, cfg.warmup)
        v = res["vanilla"]["median"]
        row = {"T": T, "prefill_ms": 1e3 * v, "routers_ms": 1e3 * res["routers"]["median"],
               "routers_ratio": res["routers"]["median"] / v, "routed_prefill_ratio": res["routed"]["median"] / v,
               "samples": {k: r["all"] for k, r in res.items()}}
        log(f"  routing T={T}: prefill {row['prefill_ms']:.1f} ms, routers {row['routers_ms']:.2f} ms "
            f"({100 * row['routers_ratio']:.2f}%), routed prefill x{row['routed_prefill_ratio']:.3f}")
        rows.append(row)
    return rows
