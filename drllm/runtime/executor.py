"""Per-block execution of a batch whose rows follow different paths.

At block ``i`` the rows with decision >= 1 run pass one and the rows with
decision 2 run pass two. A pass that every row takes runs on the full batch
with no copies. A pass that some rows take either

- **gathers** them into a contiguous buffer, runs the block and scatters the
  result back (mode ``SOME``), or
- **runs all rows and selects** the active rows' results with a precomputed
  ``[B, 1, 1]`` mask (mode ``SELECT``): no copies of per-row arguments, one
  kernel instead of a gather and a scatter, at the price of computing the
  inactive rows too. The pass's cache slot then holds every row of the
  batch (the inactive rows' K/V is never read by an active row, since
  attention never mixes rows).

Which of the two a pass uses is a measured policy (:func:`set_row_policy`,
``drllm bench`` suite 4 measures the crossover): it is fixed in the plan at
the prefill, so a sequence's cache slots keep the same rows for every decode
step. Cache-free forwards (path search, scoring) always gather, since they
process whole sequences and are compute-bound.

Row index tensors, masks and the per-block list of passes to run are
computed once per sequence (at the prefill) and reused on every decode step,
so decoding needs no host synchronisation per block; per-row arguments
restricted to a row subset are computed once per forward call and shared by
every block that runs the same rows.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable

import torch

from .. import ops
from .adapters import cache_kwarg
from .cache import RoutedCache, SlotView

NONE, ALL, SOME, SELECT = 0, 1, 2, 3
# Keyword arguments of a decoder layer that carry one entry per batch row.
ROW_KWARGS = ("attention_mask", "position_ids", "position_embeddings")

# -- gather-or-select policy -----------------------------------------------------
# A pass run by ``n`` of ``B`` rows uses SELECT when n / B >= the threshold of the
# device type (and the forward keeps a cache); > 1 means never. Defaults come
# from `drllm bench` suite 4 (benchmarks/RESULTS.md): on the CPU the block's
# cost grows with the rows it runs and gathering is never slower. The GPU
# crossover is not measured yet, so ``auto`` gathers there too until it is;
# ``set_row_policy("select")`` or DRLLM_ROW_POLICY=select opts in.
POLICIES = ("auto", "gather", "select")
_DEFAULT_SELECT_FROM = {"cpu": 2.0, "cuda": 2.0}
_policy = os.environ.get("DRLLM_ROW_POLICY", "auto").strip().lower() or "auto"
if _policy not in POLICIES:
    _policy = "auto"


def set_row_policy(policy: str | None = "auto", select_from: float | None = None) -> tuple[str, dict]:
    """Choose how passes that only some rows take are run; returns the previous setting.

    ``policy``: ``auto`` (select when the active fraction reaches the device's
    threshold), ``gather`` (always gather/scatter) or ``select`` (always run
    all rows and select). ``select_from`` overrides the ``auto`` threshold for
    every device type. Affects plans made afterwards (new sequences).
    """
    global _policy
    previous = (_policy, dict(_DEFAULT_SELECT_FROM))
    policy = (policy or "auto").lower()
    if policy not in POLICIES:
        raise ValueError(f"unknown row policy {policy!r}; expected one of {POLICIES}")
    _policy = policy
    if select_from is not None:
        for key in _DEFAULT_SELECT_FROM:
            _DEFAULT_SELECT_FROM[key] = float(select_from)
    return previous


def restore_row_policy(previous: tuple[str, dict]) -> None:
    """Undo :func:`set_row_policy` with the value it returned."""
    global _policy
    _policy = previous[0]
    _DEFAULT_SELECT_FROM.clear()
    _DEFAULT_SELECT_FROM.update(previous[1])


def row_policy() -> dict:
    """The current policy and per-device thresholds."""
    return {"policy": _policy, "select_from": dict(_DEFAULT_SELECT_FROM)}


def _selects(active: int, batch: int, device: torch.device) -> bool:
    if _policy == "gather":
        return False
    if _policy == "select":
        return True
    return active / batch >= _DEFAULT_SELECT_FROM.get(device.type, _DEFAULT_SELECT_FROM["cuda"])


@dataclass(frozen=True)
class PassPlan:
    """Which rows run one pass of a block: none, all, or ``index``.

    ``mask`` (``[B, 1, 1]`` bool, on the model's device) is set when the pass
    may run all rows and select (mode ``SELECT``); cache-free forwards gather
    ``index`` instead.
    """

    mode: int
    index: torch.Tensor | None = None
    mask: torch.Tensor | None = None


_PLAN_MEMO: dict = {}  # (device, decisions) -> plans; sharing index tensors lets blocks share row subsets
_PLAN_MEMO_SIZE = 512


def plan_block(decisions: torch.Tensor, device: torch.device) -> tuple[PassPlan, PassPlan]:
    """The (pass one, pass two) plans of one block from its ``[B]`` decisions (CPU)."""
    device = torch.device(device)
    values = tuple(decisions.tolist())
    key = (str(device), _policy, tuple(sorted(_DEFAULT_SELECT_FROM.items())), values)
    plan = _PLAN_MEMO.get(key)
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
            plans.append(PassPlan(NONE))
        elif n == batch:
            plans.append(PassPlan(ALL))
        elif _selects(n, batch, device):
            active = decisions >= 2 if second else decisions >= 1
            plans.append(PassPlan(SELECT, idx, active.to(device).view(batch, 1, 1)))
        else:
            plans.append(PassPlan(SOME, idx))
    plan = tuple(plans)
    if len(_PLAN_MEMO) >= _PLAN_MEMO_SIZE:
        _PLAN_MEMO.clear()
    _PLAN_MEMO[key] = plan
    return plan


def choose(logits: torch.Tensor, lam: float) -> torch.Tensor:
    """Decisions from router logits, shifted by the control knob ``lam`` in [-1, 1].

    ``lam < 0`` mixes the router's probabilities with a one-hot on skip,
    ``lam > 0`` with a one-hot on repeat (Dr.LLM, Appendix C).
    """
    if lam == 0:
        return logits.argmax(dim=-1)
    probs = logits.softmax(dim=-1)
    target = torch.zeros_like(probs)
    target[:, 0 if lam < 0 else 2] = 1.0
    return ((1 - abs(lam)) * probs + abs(lam) * target).argmax(dim=-1)


@dataclass
class Call:
    """State of one forward call of the patched model."""

    decisions: torch.Tensor  # [B, L] int64, CPU; filled block by block when routing
    plan: list  # per block: (PassPlan, PassPlan), or None until routed
    cache: RoutedCache | None = None
    routers: object = None
    lam: float = 0.0
    pool_mask: torch.Tensor | None = None
    observer: Callable | None = None
    inject: dict = field(default_factory=dict)  # block -> (row index, states entering that block)
    batch: int = field(init=False)
    subsets: dict = field(init=False)  # id(row index) -> per-row kwargs restricted to those rows, this call
    pooling: "Pooling | None" = field(init=False)

    def __post_init__(self):
        self.batch = self.decisions.shape[0]
        self.subsets = {}
        self.pooling = None

    def enter(self, block: int, hidden: torch.Tensor) -> tuple[torch.Tensor, tuple[PassPlan, PassPlan]]:
        """The hidden state entering ``block`` (after injected prefixes) and the block's plan."""
        if block in self.inject:
            index, states = self.inject[block]
            hidden = states.to(hidden.dtype) if index is None else ops.scatter_rows(hidden, index, states)
        if self.observer is not None:
            self.observer(block, hidden)
        if self.plan[block] is None:
            if self.pooling is None:
                self.pooling = Pooling(self.routers, self.pool_mask)
            logits = self.pooling.logits(block, hidden)
            decided = choose(logits, self.lam)
            self.decisions[:, block] = decided.cpu()
            self.plan[block] = plan_block(self.decisions[:, block], hidden.device)
        return hidden, self.plan[block]

    def subset(self, kwargs: dict, index: torch.Tensor) -> dict:
        """``kwargs`` restricted to the rows ``index``.

        The restricted per-row tensors are computed once per call, row set and
        per-row inputs (blocks given the same mask and positions share them).
        """
        sources = tuple(kwargs.get(name) for name in ROW_KWARGS)
        key = (id(index), *map(id, sources))
        cached = self.subsets.get(key)
        if cached is None or cached[0] is not index or any(a is not b for a, b in zip(cached[1], sources)):
            cached = (index, sources, row_subset(kwargs, index, self.batch))
            self.subsets[key] = cached
        out = dict(kwargs)
        for name in ROW_KWARGS:
            if name in out:
                out[name] = cached[2][name]
        return out


class Pooling:
    """Router logits of every block for one prompt batch, the pooling weights computed once.

    The windowed-mean weights depend only on the prompt's mask, so the
    reference computation (:func:`drllm.ops.pooled_router_logits_reference`)
    is split: the ``[B, W, T]`` weights once per forward call, then per block
    :func:`drllm.ops.weighted_router_logits` -- the reference's own code,
    hence the same logits. Where the ops dispatch to a fused kernel
    (Triton on CUDA), or for routers other than :class:`drllm.Routers`, each
    block calls ``routers.logits`` as before.
    """

    def __init__(self, routers, mask: torch.Tensor):
        from ..routers import Routers

        self.routers, self.mask = routers, mask
        self.hoist = type(routers).logits is Routers.logits
        self.weights = None

    def logits(self, block: int, hidden: torch.Tensor) -> torch.Tensor:
        if not self.hoist or ops._pooling_choice(hidden.device.type) != "reference":
            return self.routers.logits(block, hidden, self.mask)
        if self.weights is None:
            self.weights = ops.window_weights(self.mask, self.routers.num_windows)
        mlp = self.routers.mlps[block]
        return ops.weighted_router_logits(self.weights, hidden, mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias)


def row_subset(kwargs: dict, index: torch.Tensor, batch: int) -> dict:
    """``kwargs`` with the per-row tensors restricted to the rows ``index``."""
    out = dict(kwargs)
    for name in ROW_KWARGS:
        value = kwargs.get(name)
        if isinstance(value, torch.Tensor):
            if value.shape[0] == batch:
                out[name] = value.index_select(0, index)
        elif isinstance(value, tuple):
            out[name] = tuple(v.index_select(0, index) if v.shape[0] == batch else v for v in value)
        elif value is not None:
            raise NotImplementedError(
                f"cannot restrict {name} of type {type(value).__name__} to a row subset; "
                "load the model with attn_implementation='sdpa' or 'eager'"
            )
    return out


def routed_block(layer_forward: Callable, block: int, state) -> Callable:
    """Wrap a decoder layer's ``forward`` so it follows each row's decisions."""
    name = cache_kwarg(layer_forward)

    def forward(hidden_states, *args, **kwargs):
        call = state.call
        if call is None:  # called outside a patched model forward
            return layer_forward(hidden_states, *args, **kwargs)
        hidden_states, (first, second) = call.enter(block, hidden_states)
        cache = call.cache
        # ``kwargs`` is this call's own dict: the slot view is written into it.
        if first.mode == ALL:  # the common case: the whole batch, no copies
            if cache is not None:
                kwargs[name] = cache.views[block]
            hidden_states = layer_forward(hidden_states, *args, **kwargs)
        elif first.mode != NONE:
            hidden_states = _run_rows(layer_forward, hidden_states, args, kwargs, first, call, block, name)
        if second.mode == NONE:
            return hidden_states
        if second.mode == ALL:
            if cache is not None:
                kwargs[name] = cache.views[cache.num_blocks + block]
            return layer_forward(hidden_states, *args, **kwargs)
        slot = block + call.decisions.shape[1]
        return _run_rows(layer_forward, hidden_states, args, kwargs, second, call, slot, name)

    return forward


def _run_rows(layer_forward, hidden_states, args, kwargs, plan: PassPlan, call: Call, slot: int, name: str):
    """One pass run by a subset of the rows: select or gather/scatter (``name``: the cache keyword)."""
    cache = call.cache
    if cache is not None:
        kwargs[name] = cache.views[slot]
        if plan.mode == SELECT:
            out = layer_forward(hidden_states, *args, **kwargs)
            return torch.where(plan.mask, out, hidden_states)
    rows = ops.gather_rows(hidden_states, plan.index)
    out = layer_forward(rows, *args, **call.subset(kwargs, plan.index))
    return ops.scatter_rows(hidden_states, plan.index, out)
