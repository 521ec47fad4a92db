"""Budget routers from damage targets: learn which of the candidate skips costs an input least.

Why: the paper's 3-way labels from the shortest correct path teach the
default path for most items on a small model (near-tie answers), and lambda
then trades far more accuracy than it saves. A budget router instead ranks
candidates by their measured damage on each train item (:mod:`damage`): the
per-block damages of single skips (head ``blocks``: the row then skips its
K least damaging blocks) or the damages of a vocabulary of skip sets (head
``sets``: the row takes the least damaging set of size K). The target is the
gold margin's drop, or (label-free) the KL divergence to the full model's
answer distribution.

The router's input is the window means of the hidden state entering block
``tap`` on the default path (blocks before the tap always execute, so this
is exactly what the runtime pools), computed once per item. Training is a
listwise ranking loss: within each group of candidates the router's
softmax over negated predicted damages is fitted to the softmax of the
negated measured damages (temperature: their spread on the train part), so
only the order within a group matters, which is all :meth:`pick` uses.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import torch

from .. import ops
from ..routing.budget import BudgetRouters
from .features import extract_features

__all__ = ["BudgetConfig", "tap_features", "damage_targets", "output_groups", "listwise_loss", "predict",
           "fit_budget_routers", "TARGETS"]

TARGETS = ("margin", "kl")


@dataclass(frozen=True)
class BudgetConfig:
    """How budget routers are fitted (full-batch AdamW; the epoch kept is the one of least dev loss)."""

    head: str = "sets"
    target: str = "margin"
    epochs: int = 300
    lr: float = 3e-3
    weight_decay: float = 0.05
    seed: int = 0
    hidden: int = 128

    def __post_init__(self):
        if self.target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}, got {self.target!r}")
        if self.epochs < 1 or self.lr <= 0 or self.weight_decay < 0:
            raise ValueError("epochs must be >= 1, lr > 0 and weight_decay >= 0")


@torch.no_grad()
def tap_features(model, token_ids: Sequence[Sequence[int]], taps: Sequence[int], num_windows: int = 8, *,
                 batch_size: int = 16) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Window means ``[N, W, H]`` (float32) and validity ``[N, W]`` of the state entering each of ``taps`` on the
    default path, per tap: one batched forward per ``batch_size`` prompts serves every tap."""
    from ..runtime.adapters import describe

    n, L = len(token_ids), describe(model).num_blocks
    out: dict[int, list] = {t: [None] * n for t in taps}
    valid_rows: list = [None] * n
    for idx, means, valid in extract_features(model, token_ids, torch.ones(n, L, dtype=torch.int64), num_windows,
                                              batch_size=batch_size):
        for r, i in enumerate(idx):
            valid_rows[i] = valid[r]
            for t in taps:
                out[t][i] = means[r, t]
    valid = torch.stack(valid_rows)
    return {t: (torch.stack(rows), valid) for t, rows in out.items()}


def output_groups(routers: BudgetRouters) -> list[torch.Tensor]:
    """Output indices that compete with each other: blocks from the tap on (head ``blocks``), or the sets of
    each budget (head ``sets``)."""
    if routers.head == "blocks":
        return [torch.arange(routers.tap, routers.num_blocks)]
    groups, start = [], 0
    for listed in routers.sets.values():
        groups.append(torch.arange(start, start + len(listed)))
        start += len(listed)
    return groups


def damage_targets(records: Sequence[dict], candidates: Sequence[Sequence[int]], routers: BudgetRouters,
                   target: str) -> torch.Tensor:
    """``[N, num_outputs]`` measured damages in the routers' output order (outputs no group uses: 0).

    Head ``blocks`` reads the single-block candidates, head ``sets`` the
    vocabulary's sets; a needed candidate missing from the records is an error.
    """
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    where = {tuple(c): j for j, c in enumerate(candidates)}
    if routers.head == "blocks":
        wanted = [(b,) for b in range(routers.tap, routers.num_blocks)]
        columns = list(range(routers.tap, routers.num_blocks))
    else:
        wanted = [tuple(s) for listed in routers.sets.values() for s in listed]
        columns = list(range(len(wanted)))
    missing = [list(w) for w in wanted if w not in where]
    if missing:
        raise ValueError(f"the damage records lack candidates {missing[:3]}: measure them first")
    out = torch.zeros(len(records), routers.num_outputs, dtype=torch.float32)
    for i, rec in enumerate(records):
        values = rec.get(target)
        if values is None:
            raise ValueError(f"record {rec.get('id')!r} has no {target!r} damage (label-free records hold 'kl' only)")
        out[i, columns] = torch.tensor([float(values[where[w]]) for w in wanted])
    return out


def predict(routers: BudgetRouters, means: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Predicted damages ``[N, num_outputs]`` from window means, as :meth:`BudgetRouters.scores` computes them
    from hidden states (the MLP on each window's mean, averaged over the row's windows)."""
    mlp = routers.mlp
    logits = ops.router_mlp(means.float(), mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias)
    v = valid.to(logits.dtype)[..., None]
    return (logits * v).sum(dim=1) / v.sum(dim=1)


def listwise_loss(predicted: torch.Tensor, damage: torch.Tensor, groups: Sequence[torch.Tensor],
                  temperatures: Sequence[float]) -> torch.Tensor:
    """Cross-entropy between softmax(-damage / t) and softmax(-predicted) within each group, averaged."""
    total = predicted.new_zeros(())
    for group, t in zip(groups, temperatures):
        target = torch.softmax(-damage[:, group] / t, dim=1)
        total = total - (target * torch.log_softmax(-predicted[:, group], dim=1)).sum(dim=1).mean()
    return total / len(groups)


def fit_budget_routers(routers: BudgetRouters, train: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                       dev: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None, config: BudgetConfig) -> dict:
    """Fit ``routers`` in place on ``train = (means, valid, damage)``; keep the epoch of least ``dev`` loss (the
    last epoch without a dev part). Returns the settings, the kept epoch and the loss history."""
    torch.manual_seed(config.seed)
    groups = output_groups(routers)
    means, valid, damage = train
    temperatures = [max(float(damage[:, g].std()), 1e-6) for g in groups]
    optimizer = torch.optim.AdamW(routers.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    best, best_state, history = None, None, []
    for epoch in range(1, config.epochs + 1):
        optimizer.zero_grad()
        loss = listwise_loss(predict(routers, means, valid), damage, groups, temperatures)
        loss.backward()
        optimizer.step()
        entry = {"epoch": epoch, "train": loss.item()}
        if dev is not None:
            with torch.no_grad():
                entry["dev"] = float(listwise_loss(predict(routers, dev[0], dev[1]), dev[2], groups, temperatures))
        history.append(entry)
        score = entry.get("dev", entry["train"])
        if best is None or score < best["dev" if dev is not None else "train"]:
            best = entry
            best_state = {k: v.detach().clone() for k, v in routers.state_dict().items()}
    routers.load_state_dict(best_state)
    return {"config": asdict(config), "epoch": best["epoch"], "best": best, "temperatures": temperatures,
            "history": history[:: max(1, len(history) // 50)]}
