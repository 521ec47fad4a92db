"""Pass plans: which rows of a batch run each pass of a block, and how.

At block ``i`` the rows with decision >= 1 run pass one and the rows with
decision 2 run pass two. A pass that every row takes runs on the full batch
with no copies (:attr:`Rows.ALL`). A pass that some rows take either

- **gathers** them into a contiguous buffer, runs the block and scatters the
  result back (:attr:`Rows.SOME`), or
- **runs all rows and selects** the active rows' results with a precomputed
  ``[B, 1, 1]`` mask (:attr:`Rows.SELECT`): no copies of per-row arguments,
  one kernel instead of a gather and a scatter, at the price of computing the
  inactive rows too. The pass's cache slot then holds every row of the batch
  (the inactive rows' K/V is never read by an active row, since attention
  never mixes rows).

Which of the two a pass uses is a measured policy (:func:`set_row_policy`,
``drllm bench`` suite policy measures the crossover): it is fixed in the plan
at the prefill, so a sequence's cache slots keep the same rows for every
decode step. Cache-free forwards (path search, scoring) always gather, since
they process whole sequences and are compute-bound.
"""

from __future__ import annotations

import enum
import os
from contextvars import ContextVar
from dataclasses import dataclass

import torch

from .. import ops


class Rows(enum.IntEnum):
    """Which rows run one pass of a block."""

    NONE = 0  # no row: the pass is skipped
    ALL = 1  # every row, on the full batch
    SOME = 2  # some rows, gathered and scattered back
    SELECT = 3  # some rows: every row runs, the active rows' results are selected


# A pass run by ``n`` of ``B`` rows uses SELECT when n / B >= the threshold of the
# device type (and the forward keeps a cache); > 1 means never. Defaults come
# from `drllm bench` suite policy (benchmarks/RESULTS.md): on the CPU the block's
# cost grows with the rows it runs and gathering is never slower. The GPU
# crossover is not measured yet, so ``auto`` gathers there too until it is;
# ``set_row_policy("select")`` or DRLLM_ROW_POLICY=select opts in.
POLICIES = ("auto", "gather", "select")


@dataclass(frozen=True)
class RowPolicy:
    """How passes that only some rows take are run (see the module docstring)."""

    policy: str = "auto"
    select_from: tuple = (("cpu", 2.0), ("cuda", 2.0))  # (device type, threshold) pairs

    def selects(self, active: int, batch: int, device: torch.device) -> bool:
        if self.policy != "auto":
            return self.policy == "select"
        thresholds = dict(self.select_from)
        return active / batch >= thresholds.get(device.type, thresholds["cuda"])


def _env_policy() -> RowPolicy:
    policy = os.environ.get("DRLLM_ROW_POLICY", "auto").strip().lower() or "auto"
    return RowPolicy(policy if policy in POLICIES else "auto")


# Context-local (per thread, per asyncio task): a caller's choice never changes another caller's forward.
_POLICY: ContextVar[RowPolicy] = ContextVar("drllm_row_policy", default=_env_policy())


def current_policy() -> RowPolicy:
    """The row policy in force in this thread (context)."""
    return _POLICY.get()


def set_row_policy(policy: str | None = "auto", select_from: float | None = None) -> RowPolicy:
    """Choose how passes that only some rows take are run, in this thread (context); returns the previous setting.

    ``policy``: ``auto`` (select when the active fraction reaches the device's
    threshold), ``gather`` (always gather/scatter) or ``select`` (always run
    all rows and select). ``select_from`` overrides the ``auto`` threshold for
    every device type. Affects plans made afterwards (new sequences).
    """
    previous = _POLICY.get()
    policy = (policy or "auto").lower()
    if policy not in POLICIES:
        raise ValueError(f"unknown row policy {policy!r}; expected one of {POLICIES}")
    thresholds = previous.select_from
    if select_from is not None:
        thresholds = tuple((device, float(select_from)) for device, _ in thresholds)
    _POLICY.set(RowPolicy(policy, thresholds))
    return previous


def restore_row_policy(previous: RowPolicy) -> None:
    """Undo :func:`set_row_policy` with the value it returned."""
    _POLICY.set(previous)


def row_policy() -> dict:
    """The current policy and per-device thresholds (of this thread/context)."""
    current = _POLICY.get()
    return {"policy": current.policy, "select_from": dict(current.select_from)}


@dataclass(frozen=True)
class PassPlan:
    """Which rows run one pass of a block: none, all, or ``index``.

    ``mask`` (``[B, 1, 1]`` bool, on the model's device) is set when the pass
    may run all rows and select (:attr:`Rows.SELECT`); cache-free forwards
    gather ``index`` instead.
    """

    mode: Rows
    index: torch.Tensor | None = None
    mask: torch.Tensor | None = None


EVERY_ROW = (PassPlan(Rows.ALL), PassPlan(Rows.NONE))  # a block every row executes once


def plan_block(decisions: torch.Tensor, device, policy: RowPolicy, memo: dict) -> tuple[PassPlan, PassPlan]:
    """The (pass one, pass two) plans of one block from its ``[B]`` decisions (CPU).

    ``memo`` belongs to one call: blocks with the same decisions share one plan,
    hence one row index, hence one set of row-restricted arguments.
    """
    device = torch.device(device)
    values = tuple(decisions.tolist())
    key = (str(device), values)
    plan = memo.get(key)
    if plan is not None:
        return plan
    batch = len(values)
    counts = (sum(v >= 1 for v in values), sum(v == 2 for v in values))
    index = (None, None)
    if any(0 < n < batch for n in counts):
        index = ops.compact_rows(decisions.to(device))
    plans = []
    for second, (n, idx) in enumerate(zip(counts, index)):
        if n == 0:
            plans.append(PassPlan(Rows.NONE))
        elif n == batch:
            plans.append(PassPlan(Rows.ALL))
        elif policy.selects(n, batch, device):
            active = decisions >= 2 if second else decisions >= 1
            plans.append(PassPlan(Rows.SELECT, idx, active.to(device).view(batch, 1, 1)))
        else:
            plans.append(PassPlan(Rows.SOME, idx))
    memo[key] = plan = tuple(plans)
    return plan


def prefix_plan(decisions: torch.Tensor, states: list, sources: torch.Tensor, device):
    """Decisions to execute and states to inject so that each row starts at its first edit.

    ``states`` are the hidden states entering each block on the default path
    for some inputs, and row ``b`` is input ``sources[b]``: the blocks before a
    row's first decision that is not 1 are the default path's, so the row
    starts there from the stored state instead of recomputing them.
    """
    batch, L = decisions.shape
    if sources.shape != (batch,):
        raise ValueError(f"prefix sources must give one input row per batch row ({batch}), got {tuple(sources.shape)}")
    edited = decisions != 1
    starts = torch.where(edited.any(1), edited.int().argmax(1), L - 1)
    executed = decisions.masked_fill(torch.arange(L)[None] < starts[:, None], 0)
    inject = {}
    for block in starts.unique().tolist():
        rows = torch.nonzero(starts == block).flatten()
        src = states[block].index_select(0, sources[rows].to(states[block].device))
        inject[block] = (None if len(rows) == batch else rows.to(device), src)
    return executed, inject


def replan(decisions: torch.Tensor, old_plan: list) -> list:
    """The plans of a cache's rows after they were reordered, selected or repeated (beams).

    ``decisions`` are the new rows' ``[B, L]`` decisions (each a copy of an
    old row's). Each pass keeps the kind its slot was filled with, so the
    slot's rows can be mapped rather than recomputed: a pass that every new
    row or no new row takes becomes :attr:`Rows.ALL` or :attr:`Rows.NONE`,
    one that some rows take stays :attr:`Rows.SOME` (its slot holds those
    rows) or :attr:`Rows.SELECT` (its slot holds every row).
    """
    batch = decisions.shape[0]
    memo: dict = {}
    plans = []
    for block, passes in enumerate(old_plan):
        column = decisions[:, block]
        device = next((p.index.device for p in passes if p.index is not None), None)
        key = (tuple(column.tolist()), tuple(p.mode for p in passes), str(device))
        if key not in memo:
            index = (None, None)
            new = []
            for second, old in enumerate(passes):
                active = column >= 2 if second else column >= 1
                n = int(active.sum())
                if n == 0:
                    new.append(PassPlan(Rows.NONE))
                elif n == batch:
                    new.append(PassPlan(Rows.ALL))
                else:
                    if old.mode not in (Rows.SOME, Rows.SELECT):  # a row copied from an active row is active
                        raise AssertionError(f"block {block}: rows reordered into a pass that no old row ran")
                    if index[0] is None:
                        index = ops.compact_rows(column.to(device))
                    mask = active.to(device).view(batch, 1, 1) if old.mode == Rows.SELECT else None
                    new.append(PassPlan(old.mode, index[second], mask))
            memo[key] = tuple(new)
        plans.append(memo[key])
    return plans
