"""The label policy: which path each searched item teaches, and which decisions are too thin to learn.

Every rule here reads the train part only. The dev part (:func:`split_dev`)
gets its labels by the same rules, so that no knob chosen on it, and no
label it holds, depends on the dev items themselves.
"""

from __future__ import annotations

import os
from typing import Sequence

import torch

from ..search import shared_skip, skip_loses, single_skip_paths
from .records import read_path_records

__all__ = ["CLASS_NAMES", "EXECUTE", "label_path", "load_path_records", "split_dev", "train_shared_skip",
           "trusted_labels"]

CLASS_NAMES = ("skip", "execute", "repeat")
EXECUTE = 1


def label_path(record: dict, min_margin: float = 0.0, shared: int | None = None, probe: dict | None = None) -> str:
    """The path a search record teaches: its best correct path that wins by ``min_margin``, else the
    shared skip, else the default.

    Candidates are the record's ``good_paths`` (and ``best_path``) whose gold
    answer beats every other choice by at least ``min_margin`` of normalised
    log-likelihood (generation records carry no margin and count every
    correct path); the shortest wins, then the widest margin. On a small model
    most answers are near ties, and a path that only just flips one teaches
    routers noise, which they then apply to inputs where it costs accuracy.

    A record with no such path teaches skipping block ``shared`` alone
    (:func:`train_shared_skip`) when its own skip ``probe``
    (:func:`drllm.search.probe_skips`) shows that skip not turning its right
    answer wrong; otherwise the default path (execute every block).
    """
    L = int(record["num_blocks"])
    found = list(record.get("good_paths") or [])
    if record.get("best_path") is not None:
        found.append({"path": record["best_path"], "margin": record.get("best_margin"),
                      "length": record.get("best_length")})
    wins = [g for g in found if g["margin"] is None or g["margin"] >= min_margin]
    if wins:
        best = min(wins, key=lambda g: (sum(map(int, g["path"])), -(g["margin"] or 0.0), g["path"]))
        return best["path"]
    if shared is not None and probe is not None and not skip_loses(probe, shared):
        return single_skip_paths(L)[shared]
    return "1" * L


def load_path_records(paths_file: str | os.PathLike, num_blocks: int | None = None,
                      min_margin: float = 0.0, shared: int | None = None,
                      probes: dict[str, dict] | None = None) -> list[dict]:
    """Records of a search JSONL file (:func:`drllm.train.read_path_records`), each with its training
    ``label`` (:func:`label_path`; ``probes`` maps ids to skip-probe records)."""
    return [{**rec, "label": label_path(rec, min_margin, shared, (probes or {}).get(rec.get("id")))}
            for rec in read_path_records(paths_file, num_blocks)]


def split_dev(n: int, dev_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices of the train and dev parts of ``n`` records: a seeded permutation, ``dev_fraction`` of them
    (at least one, and one fewer than all) in dev; no dev part with ``dev_fraction`` 0 or one record."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_dev = min(max(int(round(n * dev_fraction)), 1), n - 1) if dev_fraction > 0 and n >= 2 else 0
    return sorted(perm[n_dev:]), sorted(perm[:n_dev])


def train_shared_skip(probes: dict[str, dict], train_ids: Sequence[str]) -> int | None:
    """:func:`drllm.search.shared_skip` of the train part's probes only."""
    return shared_skip([probes[i] for i in train_ids if i in probes])


def trusted_labels(labels: torch.Tensor, train_idx: Sequence[int], min_count: int) -> tuple[torch.Tensor, int]:
    """``labels`` (``[N, L]`` decisions) with every thinly taught decision turned into execute; and how many
    (block, decision) pairs that dropped.

    Rule: a skip or repeat is learned at block ``i`` only when at least
    ``min_count`` items of the train part teach it there; otherwise every item
    teaching it at that block (train and dev alike) teaches execute. Why:
    class-balanced weights give a decision seen twice the pull of one seen
    hundreds of times, and routers then apply what two items taught to every
    input (on the quick demo: skips of blocks 0-2 everywhere). ``min_count``
    0 or 1 keeps every label.
    """
    L = labels.shape[1]
    counts = torch.zeros(L, 3, dtype=torch.long)
    train = labels[torch.as_tensor(list(train_idx), dtype=torch.long)]
    counts.scatter_add_(1, train.T.long(), torch.ones_like(train.T, dtype=torch.long))
    thin = counts < min_count
    thin[:, EXECUTE] = False
    dropped = thin & (counts > 0)
    untrusted = thin[torch.arange(L)[None, :], labels.long()]  # [N, L]
    return torch.where(untrusted, torch.full_like(labels, EXECUTE), labels), int(dropped.sum())
