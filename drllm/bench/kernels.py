"""Suite ``kernels``: the hot-path ops' bandwidth as a share of a plain copy of the same bytes, in one run.

A device-to-device ``copy_`` is the ceiling of a memory-bound op. Row gather
and scatter must read and write the rows they move; the fused pooling must
read the prompt's hidden states once. Each op's bytes per second divided by
the copy's is its share of the copy bandwidth (1.0: as fast as memory allows).
"""

from __future__ import annotations

import torch

from .config import BenchConfig
from .timing import interleaved


def bench_kernels(model, cfg: BenchConfig, log=print) -> list[dict]:
    """Gather, scatter and pooling on hidden states shaped like ``model``'s, against a copy of the same bytes."""
    from .. import ops

    device, dtype = model.device, model.dtype
    H = model.config.hidden_size
    B, T = 8, max(cfg.prefill_lengths)
    inner = 20 if device.type == "cuda" else 1  # amortise launches on the GPU
    g = torch.Generator().manual_seed(cfg.seed)
    hidden = torch.randn(B, T, H, generator=g).to(device, dtype)
    index = torch.arange(0, B, 2, device=device)  # half the rows
    rows = hidden.index_select(0, index)
    mask = torch.ones(B, T, dtype=torch.long, device=device)
    w1 = torch.randn(128, H, generator=g).to(device) / H**0.5
    b1, w2, b2 = torch.zeros(128, device=device), torch.randn(3, 128, generator=g).to(device) / 128**0.5, torch.zeros(3, device=device)
    half, full = torch.empty_like(rows), torch.empty_like(hidden)
    size = hidden.element_size()

    def repeat(fn):
        return lambda: (lambda: [fn() for _ in range(inner)], lambda: None)

    res = interleaved({
        "copy (rows)": repeat(lambda: half.copy_(rows)),
        "copy (all)": repeat(lambda: full.copy_(hidden)),
        "gather_rows": repeat(lambda: ops.gather_rows(hidden, index)),
        "scatter_rows": repeat(lambda: ops.scatter_rows(hidden, index, rows, inplace=True)),
        "pooled_router_logits": repeat(lambda: ops.pooled_router_logits(hidden, mask, 8, w1, b1, w2, b2, validate=False)),
    }, max(cfg.repeats, 3), device, warmup=True)
    moved = {  # bytes each op must read and write
        "copy (rows)": 2 * rows.numel() * size,
        "copy (all)": 2 * hidden.numel() * size,
        "gather_rows": 2 * rows.numel() * size,
        "scatter_rows": 2 * rows.numel() * size,
        "pooled_router_logits": hidden.numel() * size,
    }
    bandwidth = {name: moved[name] * inner / r["median"] for name, r in res.items()}
    out = []
    for name, ceiling in (("gather_rows", "copy (rows)"), ("scatter_rows", "copy (rows)"),
                          ("pooled_router_logits", "copy (all)")):
        row = {"op": name, "backend": ops.backend(device)["pooling" if name.startswith("pooled") else "rows"],
               "shape": [B, T, H], "dtype": str(dtype).replace("torch.", ""), "GB_s": bandwidth[name] / 1e9,
               "copy_GB_s": bandwidth[ceiling] / 1e9, "share_of_copy": bandwidth[name] / bandwidth[ceiling],
               "us_per_op": 1e6 * res[name]["median"] / inner}
        out.append(row)
        log(f"  kernels {name} ({row['backend']}): {row['GB_s']:.1f} GB/s, copy {row['copy_GB_s']:.1f} GB/s, "
            f"{100 * row['share_of_copy']:.0f}% of copy")
    return out
