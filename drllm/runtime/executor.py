"""Running a plan over the blocks: each patched block follows the rows' decisions of the current call.

A forward call's state (decisions, plans, pooling inputs, the row policy in
force) lives in a :class:`Call`, made by the patched model forward and reached
by the patched blocks through a context variable (:func:`running`). Row index
tensors, masks and the per-block list of passes to run are computed once per
sequence (at the prefill) and reused on every decode step, so decoding needs
no host synchronisation per block; per-row arguments restricted to a row
subset are computed once per forward call and shared by every block that runs
the same rows.
"""

from __future__ import annotations

import functools
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Callable

import torch

from .. import ops
from ..routing import Pooling, choose, limit_skip_runs
from .cache import RoutedCache
from .plan import PassPlan, RowPolicy, Rows, current_policy, plan_block

# Keyword arguments of a decoder layer that carry one entry per batch row.
ROW_KWARGS = ("attention_mask", "position_ids", "position_embeddings")


@dataclass
class Call:
    """Everything one forward call of a patched model computes with, owned by that call.

    It is made by the patched model forward, reached by the patched blocks
    through a context variable (:func:`running`), and dropped when the forward
    returns; what outlives the call (decisions, plans) is frozen on the routed
    cache. Concurrent calls (threads) and nested calls (an observer calling the
    model) therefore never see each other's state.
    """

    owner: object  # the RoutingState of the patched model this call runs
    decisions: torch.Tensor  # [B, L] int64, CPU; filled block by block when routing
    plan: list  # per block: (PassPlan, PassPlan), or None until routed
    cache: RoutedCache | None = None
    routers: object = None
    lam: float = 0.0
    lam_rule: str = "shift"
    max_skip_run: int | None = None  # routed decisions never skip more consecutive blocks (None: no limit)
    budget: int | None = None  # with budget routers: blocks each row skips, its whole path picked at their tap
    pool_mask: torch.Tensor | None = None
    observer: Callable | None = None
    inject: dict = field(default_factory=dict)  # block -> (row index, states entering that block)
    devices: tuple = ()  # per block: the device its inputs must be on (accelerate-dispatched blocks), or None
    policy: RowPolicy = field(default_factory=current_policy)
    memo: dict = field(default_factory=dict)  # plans by (device, decisions), shared by the blocks of this call
    batch: int = field(init=False)
    subsets: dict = field(init=False)  # id(row index) -> per-row kwargs restricted to those rows, this call
    pooling: Pooling | None = field(init=False)

    def __post_init__(self):
        self.batch = self.decisions.shape[0]
        self.subsets = {}
        self.pooling = None

    def plan_rows(self, decisions: torch.Tensor, device) -> tuple[PassPlan, PassPlan]:
        """Plan one block from its ``[B]`` decisions, with this call's row policy and memo."""
        return plan_block(decisions, device, self.policy, self.memo)

    def enter(self, block: int, hidden: torch.Tensor) -> tuple[torch.Tensor, tuple[PassPlan, PassPlan]]:
        """The hidden state entering ``block`` (after injected prefixes) and the block's plan."""
        device = self.devices[block] if self.devices else None
        if device is not None and hidden.device != device:
            hidden = hidden.to(device)  # rows are gathered and scattered where the block runs
        if block in self.inject:
            index, states = self.inject[block]
            states = states.to(hidden.device, hidden.dtype)
            hidden = states if index is None else ops.scatter_rows(hidden, index.to(hidden.device), states)
        if self.observer is not None:
            self.observer(block, hidden)
        if self.plan[block] is None and self.budget is not None:
            self.decide_budget(block, hidden)
        elif self.plan[block] is None:
            self.decisions[:, block] = self.decide(block, hidden)
            self.plan[block] = self.plan_rows(self.decisions[:, block], hidden.device)
        return hidden, self.plan[block]

    def decide_budget(self, tap: int, hidden: torch.Tensor) -> None:
        """Every row's whole path from the budget routers, read once at their ``tap`` block: the decisions and
        plans of blocks ``tap`` and after, at once (the blocks before run every row)."""
        paths = self.routers.pick(self.routers.scores(hidden, self.pool_mask), self.budget)
        self.decisions[:, tap:] = paths[:, tap:]
        for i in range(tap, len(self.plan)):
            device = (self.devices[i] if self.devices else None) or hidden.device
            self.plan[i] = self.plan_rows(self.decisions[:, i], device)

    def decide(self, block: int, hidden: torch.Tensor) -> torch.Tensor:
        """The routers' ``[B]`` decisions (CPU) for ``block``, under the knob and the skip-run limit.

        ``lam = +-1`` are the knob's ends (all skip, all repeat) and are not limited.
        """
        if self.pooling is None:
            self.pooling = Pooling(self.routers, self.pool_mask)
        decided = choose(self.pooling.logits(block, hidden), self.lam, self.lam_rule).cpu()
        if abs(self.lam) >= 1:
            return decided
        return limit_skip_runs(self.decisions[:, :block], decided, self.max_skip_run)

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


_CURRENT: ContextVar[Call | None] = ContextVar("drllm_call", default=None)


@contextmanager
def running(call: Call):
    """Make ``call`` the one the patched blocks of its model see, for this thread (context)."""
    token = _CURRENT.set(call)
    try:
        yield call
    finally:
        _CURRENT.reset(token)


def current_call(owner) -> Call | None:
    """The call of ``owner``'s model running in this context, if any."""
    call = _CURRENT.get()
    return call if call is not None and call.owner is owner else None


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


def routed_block(layer, block: int, owner, name: str) -> Callable:
    """A ``forward`` for decoder ``layer`` that follows each row's decisions in the current call of ``owner``.

    ``name`` is the keyword the layer class takes its cache by (a hook's
    ``forward(*args, **kwargs)`` does not say). Decode steps run the block
    compiled when :func:`drllm.compile` asked for it; the routing between
    blocks always runs eagerly. A ``functools.partial`` holding the layer and
    the model's state: a deep copy of the model gets a forward of its own.
    """
    # ``layer.forward``: the instance's own (e.g. an accelerate hook) or the class's
    return functools.partial(block_forward, functools.partial(run_block, owner, layer, layer.forward, name),
                             layer.forward, block, owner, name)


def run_block(owner, layer, layer_forward, name: str, hidden_states, *args, **kwargs):
    """One pass of ``layer``: compiled on decode steps when :func:`drllm.compile` asked for it."""
    compiled = owner.compiled
    if compiled is not None and hidden_states.shape[1] == 1 and kwargs.get(name) is not None:
        return compiled(layer, hidden_states, *args, **kwargs)
    return layer_forward(hidden_states, *args, **kwargs)


def block_forward(run, layer_forward, block: int, owner, name: str, hidden_states, *args, **kwargs):
    """The routed pass(es) of one block in the current call of ``owner`` (its ``layer_forward`` outside one)."""
    call = current_call(owner)
    if call is None:  # called outside a forward of the patched model
        return layer_forward(hidden_states, *args, **kwargs)
    hidden_states, plans = call.enter(block, hidden_states)
    # ``kwargs`` is this call's own dict: the slot view is written into it.
    for second_pass, plan in enumerate(plans):
        if plan.mode == Rows.NONE:
            continue
        if call.cache is not None:
            kwargs[name] = call.cache.view(block, bool(second_pass))
        if plan.mode == Rows.ALL:  # the common case: the whole batch, no copies
            hidden_states = run(hidden_states, *args, **kwargs)
        else:
            hidden_states = _run_rows(run, hidden_states, args, kwargs, plan, call)
    return hidden_states


def _run_rows(layer_forward, hidden_states, args, kwargs, plan: PassPlan, call: Call):
    """One pass run by a subset of the rows: select (with a cache) or gather/scatter."""
    if plan.mode == Rows.SELECT and call.cache is not None:
        out = layer_forward(hidden_states, *args, **kwargs)
        return torch.where(plan.mask, out, hidden_states)
    rows = ops.gather_rows(hidden_states, plan.index)
    out = layer_forward(rows, *args, **call.subset(kwargs, plan.index))
    return ops.scatter_rows(hidden_states, plan.index, out)
