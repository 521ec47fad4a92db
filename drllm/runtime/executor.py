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

import math
import os
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Callable

import torch

from .. import ops
from .cache import RoutedCache

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
    may run all rows and select (mode ``SELECT``); cache-free forwards gather
    ``index`` instead.
    """

    mode: int
    index: torch.Tensor | None = None
    mask: torch.Tensor | None = None


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
            plans.append(PassPlan(NONE))
        elif n == batch:
            plans.append(PassPlan(ALL))
        elif policy.selects(n, batch, device):
            active = decisions >= 2 if second else decisions >= 1
            plans.append(PassPlan(SELECT, idx, active.to(device).view(batch, 1, 1)))
        else:
            plans.append(PassPlan(SOME, idx))
    memo[key] = plan = tuple(plans)
    return plan


# -- the control knob --------------------------------------------------------------
LAM_RULES = ("shift", "mix")
# Nats added per step of depth (skip < execute < repeat) at lam = +-0.5; the
# shift is LAM_SCALE * tan(pi * lam / 2), so it grows without bound towards +-1.
LAM_SCALE = 2.0


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
    pool_mask: torch.Tensor | None = None
    observer: Callable | None = None
    inject: dict = field(default_factory=dict)  # block -> (row index, states entering that block)
    devices: tuple = ()  # per block: the device its inputs must be on (accelerate-dispatched blocks), or None
    policy: RowPolicy = field(default_factory=_POLICY.get)
    memo: dict = field(default_factory=dict)  # plans by (device, decisions), shared by the blocks of this call
    batch: int = field(init=False)
    subsets: dict = field(init=False)  # id(row index) -> per-row kwargs restricted to those rows, this call
    pooling: "Pooling | None" = field(init=False)

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
        if self.plan[block] is None:
            if self.pooling is None:
                self.pooling = Pooling(self.routers, self.pool_mask)
            logits = self.pooling.logits(block, hidden)
            self.decisions[:, block] = self.constrain(block, choose(logits, self.lam, self.lam_rule).cpu())
            self.plan[block] = self.plan_rows(self.decisions[:, block], hidden.device)
        return hidden, self.plan[block]

    def constrain(self, block: int, decided: torch.Tensor) -> torch.Tensor:
        """``decided`` with a skip turned into an execution where it would make too long a run of skips.

        The search never explores such paths (``SearchConfig.max_skip_run``),
        so routers have never seen them work. ``lam = +-1`` are the knob's
        ends (all skip, all repeat) and are not constrained.
        """
        run = self.max_skip_run
        if run is None or block < run or abs(self.lam) >= 1:
            return decided
        skipped_before = (self.decisions[:, block - run : block] == 0).all(dim=1)
        return torch.where(skipped_before & (decided == 0), torch.ones_like(decided), decided)

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


class Pooling:
    """Router logits of every block for one prompt batch, the pooling weights computed once.

    The windowed-mean weights depend only on the prompt's mask, so the
    reference computation (:func:`drllm.ops.pooled_router_logits_reference`)
    is split: the ``[B, W, T]`` weights once per forward call (and device),
    then per block :func:`drllm.ops.weighted_router_logits` -- the reference's
    own code, hence the same logits. Where the ops dispatch to a fused kernel
    (Triton on CUDA), or for routers other than :class:`drllm.Routers`, each
    block calls ``routers.logits``. Each block's router may live on its own
    device (accelerate-dispatched models): its inputs are moved there.
    """

    def __init__(self, routers, mask: torch.Tensor):
        from ..routers import Routers

        self.routers, self.mask = routers, mask
        self.hoist = type(routers).logits is Routers.logits
        self.weights = {}  # device -> pooling weights

    def logits(self, block: int, hidden: torch.Tensor) -> torch.Tensor:
        device = self.routers.mlps[block].fc1.weight.device if self.hoist else hidden.device
        hidden = hidden.to(device)
        if not self.hoist or ops.pooling_choice(device.type) != "reference":
            return self.routers.logits(block, hidden, self.mask.to(device))
        if device not in self.weights:
            self.weights[device] = ops.window_weights(self.mask.to(device), self.routers.num_windows)
        mlp = self.routers.mlps[block]
        return ops.weighted_router_logits(
            self.weights[device], hidden, mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias
        )


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
    blocks always runs eagerly.
    """
    layer_forward = layer.forward  # the instance's own (e.g. an accelerate hook) or the class's

    def run(hidden_states, *args, **kwargs):
        compiled = owner.compiled
        if compiled is not None and hidden_states.shape[1] == 1 and kwargs.get(name) is not None:
            return compiled(layer, hidden_states, *args, **kwargs)
        return layer_forward(hidden_states, *args, **kwargs)

    def forward(hidden_states, *args, **kwargs):
        call = current_call(owner)
        if call is None:  # called outside a forward of the patched model
            return layer_forward(hidden_states, *args, **kwargs)
        hidden_states, (first, second) = call.enter(block, hidden_states)
        cache = call.cache
        # ``kwargs`` is this call's own dict: the slot view is written into it.
        if first.mode == ALL:  # the common case: the whole batch, no copies
            if cache is not None:
                kwargs[name] = cache.views[block]
            hidden_states = run(hidden_states, *args, **kwargs)
        elif first.mode != NONE:
            hidden_states = _run_rows(run, hidden_states, args, kwargs, first, call, block, name)
        if second.mode == NONE:
            return hidden_states
        if second.mode == ALL:
            if cache is not None:
                kwargs[name] = cache.views[cache.num_blocks + block]
            return run(hidden_states, *args, **kwargs)
        slot = block + call.decisions.shape[1]
        return _run_rows(run, hidden_states, args, kwargs, second, call, slot, name)

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
