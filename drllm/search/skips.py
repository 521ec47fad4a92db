"""Single-block skip probe: what skipping each block alone does to each searched item.

Why: on a small model a single skip flips many answers both ways (8-38 % of
ARC-Easy items on SmolLM2-135M), so the paths the search finds item by item
skip blocks at scattered places and routers cannot learn them. What routers
can learn is a skip many items share. The probe measures, for every item and block, the gold margin with only that
block skipped; :func:`shared_skip` picks the block whose skip gains at least
as many items as it loses (the most net gain, then the fewest flips), and
:func:`drllm.train.label_path` lets items without a decisive path of their own
teach that skip instead of the full path, unless the item's own probe shows
the skip costing its answer. (On SmolLM2-135M the block picked this way did
not hold up on validation items: ``benchmarks/RESULTS.md``, Demo.)

Records (one JSONL line per item, appended and fsynced, resumed by id like
the search's, under the same lock and settings check): ``id``, ``num_blocks``, ``default_margin``, ``skip_margins``
(``[L]``: the margin with block i skipped), ``seconds``. Log-likelihood
rewards only (margins).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Sequence

from ..artifacts import claim_output, exclusive_lock
from ..tasks import Example
from .evaluator import PathEvaluator
from .run import SearchConfig, append_missing, output_settings

__all__ = ["probe_skips", "single_skip_paths", "skip_loses", "block_gains", "shared_skip"]


def single_skip_paths(num_blocks: int) -> list[str]:
    """The ``num_blocks`` paths that skip exactly one block."""
    return ["1" * i + "0" + "1" * (num_blocks - i - 1) for i in range(num_blocks)]


def probe_skips(model: Any, tokenizer: Any, examples: Sequence[Example], out_path: str | os.PathLike, *,
                config: SearchConfig | None = None, progress: bool = True,
                settings: dict | None = None, overwrite: bool = False) -> list[dict]:
    """Probe every single-block skip on each example into ``out_path`` (skipping ids already there);
    returns the records of ``examples`` in their order. ``settings`` and ``overwrite``: as
    :func:`drllm.search.run_search`."""
    config = config or SearchConfig()
    out = Path(out_path)
    with exclusive_lock(out):
        claim_output(out, output_settings("skip probe", model, examples, settings, style=config.style,
                                          normalize=config.normalize), overwrite)
        done = append_missing(out, examples, lambda ex: _probe(model, tokenizer, ex, config), desc="skip probe",
                              progress=progress)
    return [done[e.id] for e in examples]


def _probe(model: Any, tokenizer: Any, example: Example, config: SearchConfig) -> dict:
    """One example's probe record: the gold margin by default and with each single block skipped."""
    start = time.perf_counter()
    ev = PathEvaluator(model, tokenizer, example, mode="loglik", prefix=config.prefix, max_paths=config.batch,
                       max_rows=config.max_rows, style=config.style, normalize=config.normalize)
    results = ev.evaluate(single_skip_paths(ev.num_blocks))
    return {"id": example.id, "num_blocks": ev.num_blocks, "default_margin": ev.default.margin,
            "skip_margins": [r.margin for r in results], "seconds": round(time.perf_counter() - start, 4)}


def skip_loses(probe: dict, block: int) -> bool:
    """Whether skipping ``block`` turns the probed item's right answer wrong."""
    return probe["default_margin"] > 0 and probe["skip_margins"][block] <= 0


def block_gains(records: Sequence[dict]) -> list[dict]:
    """Per block: items whose answer the skip makes right (``gained``) or wrong (``lost``), and ``net``."""
    if not records:
        return []
    L = records[0]["num_blocks"]
    out = []
    for i in range(L):
        lost = sum(1 for r in records if skip_loses(r, i))
        gained = sum(1 for r in records if r["default_margin"] <= 0 and r["skip_margins"][i] > 0)
        out.append({"block": i, "gained": gained, "lost": lost, "net": gained - lost})
    return out


def shared_skip(records: Sequence[dict]) -> int | None:
    """The block the items can best do without: the most net gain (at least 0), then the fewest flips,
    then the lowest index; None when every skip loses more items than it gains (or no records)."""
    ok = [g for g in block_gains(records) if g["net"] >= 0]
    if not ok:
        return None
    return min(ok, key=lambda g: (-g["net"], g["gained"] + g["lost"], g["block"]))["block"]
