"""From router logits to decisions: the control knob lambda and the skip-run constraint.

Both are rules about what a row decides, so they live with the routers and
not with the runtime that executes the decisions.
"""

from __future__ import annotations

import math
import reprlib

import torch

LAM_RULES = ("shift", "mix")
# Nats added per step of depth (skip < execute < repeat) at lam = +-0.5; the
# shift is LAM_SCALE * tan(pi * lam / 2), so it grows without bound towards +-1.
LAM_SCALE = 2.0


def check_lam(lam: float, rule: str) -> tuple[float, str]:
    """``(lam, rule)`` validated: lam in [-1, 1], rule one of :data:`LAM_RULES`."""
    lam = float(lam)
    if not -1.0 <= lam <= 1.0:
        raise ValueError(f"lam must be in [-1, 1] (negative favours skipping, positive repeating), got {lam}")
    if rule not in LAM_RULES:
        raise ValueError(f"unknown lam rule {rule!r}; expected one of {LAM_RULES}")
    return lam, rule


def choose(logits: torch.Tensor, lam: float, rule: str = "shift") -> torch.Tensor:
    """Decisions from router logits, moved by the control knob ``lam`` in [-1, 1].

    ``shift`` (default): the log-probabilities of skip, execute and repeat get
    ``-s, 0, +s`` with ``s = LAM_SCALE * tan(pi * lam / 2)``. The argmax of
    ``a_k + s * k`` can only move towards deeper decisions as ``s`` grows, so
    every row's decision is monotone in ``lam``; 0 is the router's argmax,
    -1 skips and +1 repeats every block, and decisions change smoothly in
    between. ``mix`` is the paper's rule (Dr.LLM, Appendix C): the
    probabilities mixed with a one-hot on skip or repeat, which already
    decides every row at ``|lam| >= 0.5``.
    """
    if rule not in LAM_RULES:
        raise ValueError(f"unknown lam rule {rule!r}; expected one of {LAM_RULES}")
    if lam == 0:
        return logits.argmax(dim=-1)
    if abs(lam) >= 1:
        return torch.full(logits.shape[:-1], 0 if lam < 0 else 2, dtype=torch.int64, device=logits.device)
    if rule == "mix":
        probs = logits.softmax(dim=-1)
        target = torch.zeros_like(probs)
        target[:, 0 if lam < 0 else 2] = 1.0
        return ((1 - abs(lam)) * probs + abs(lam) * target).argmax(dim=-1)
    depth = torch.arange(logits.shape[-1], device=logits.device, dtype=torch.float32)
    shift = LAM_SCALE * math.tan(math.pi * lam / 2)
    return (logits.float().log_softmax(dim=-1) + shift * depth).argmax(dim=-1)


def check_max_skip_run(max_skip_run: int | None) -> int | None:
    if max_skip_run is not None and (type(max_skip_run) is not int or max_skip_run < 0):  # bool refused
        raise ValueError(f"max_skip_run must be a count of blocks >= 0 or None, got {reprlib.repr(max_skip_run)}")
    return max_skip_run


def limit_skip_runs(before: torch.Tensor, decided: torch.Tensor, max_skip_run: int | None) -> torch.Tensor:
    """``decided`` (``[B]``, one block) with a skip turned into an execution where it would make too long a run.

    ``before`` holds each row's decisions of the blocks before this one
    (``[B, i]``). The search never explores paths with more than
    ``max_skip_run`` consecutive skips, so routers have never seen them work;
    None lifts the limit.
    """
    run = max_skip_run
    if run is None or before.shape[1] < run:
        return decided
    skipped_before = (before[:, before.shape[1] - run :] == 0).all(dim=1)
    return torch.where(skipped_before & (decided == 0), torch.ones_like(decided), decided)
