"""Retrofitting a loaded model instance: patch, unpatch, forced paths."""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from ..paths import as_paths, default_path
from ..routers import Routers
from .adapters import cache_kwarg, describe
from .cache import RoutedCache
from .executor import ALL, Call, PassPlan, plan_block, routed_block

STATE_ATTR = "_drllm_state"


@dataclass
class RoutingState:
    """Everything the patch adds to a model instance, kept in one place."""

    num_blocks: int
    routers: Routers | None = None
    lam: float = 0.0
    forced: torch.Tensor | None = None
    prefix: tuple | None = None  # (states entering each block on the default path, source row per row)
    observer: object = None
    call: Call | None = None
    last: torch.Tensor | None = None
    wrapped: list = field(default_factory=list)  # modules whose forward was replaced


def _state(model: nn.Module) -> RoutingState | None:
    return getattr(describe(model).base, STATE_ATTR, None)


def is_patched(model: nn.Module) -> bool:
    return _state(model) is not None


def _require_state(model: nn.Module) -> RoutingState:
    state = _state(model)
    if state is None:
        raise RuntimeError("this model is not patched: call drllm.patch(model, routers) first")
    return state


def _check_lam(lam: float) -> float:
    lam = float(lam)
    if not -1.0 <= lam <= 1.0:
        raise ValueError(f"lam must be in [-1, 1] (negative favours skipping, positive repeating), got {lam}")
    return lam


def patch(model: nn.Module, routers: Routers | None = None, lam: float = 0.0) -> nn.Module:
    """Route ``model`` (a loaded HF decoder model) in place and return it.

    Each row's path is decided once, on the prompt, by ``routers`` (or set by
    :func:`forced_paths`); without routers every block executes once.
    :func:`unpatch` restores the instance exactly.
    """
    info = describe(model)
    base = info.base
    if getattr(base, STATE_ATTR, None) is not None:
        raise RuntimeError("this model is already patched: call drllm.unpatch(model) before patching it again")
    if routers is not None:
        routers.check_compatible(info.model_type, info.hidden_size, info.num_blocks)
        routers.to(info.device)
    state = RoutingState(info.num_blocks, routers, _check_lam(lam))
    for i, layer in enumerate(base.layers):
        layer.forward = routed_block(layer.forward, i, state)
    base.forward = _routed_model_forward(base, base.forward, state)
    state.wrapped = [base, *base.layers]
    setattr(base, STATE_ATTR, state)
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Undo :func:`patch`: the instance behaves and serialises as before."""
    base = describe(model).base
    state = _require_state(model)
    for module in state.wrapped:
        del module.forward  # drops the instance attribute, exposing the class method again
    delattr(base, STATE_ATTR)
    return model


def set_lam(model: nn.Module, lam: float) -> None:
    """Change the control knob of a patched model."""
    _require_state(model).lam = _check_lam(lam)


def last_paths(model: nn.Module) -> torch.Tensor:
    """The ``[B, L]`` decisions used by the last forward call (or generation) of ``model``."""
    state = _require_state(model)
    if state.last is None:
        raise RuntimeError("no routed forward call has run on this model yet")
    return state.last.clone()


@contextmanager
def _patched(model: nn.Module, **settings):
    """Patch ``model`` if needed and set ``settings`` on its state for the duration of the block."""
    temporary = not is_patched(model)
    if temporary:
        patch(model)
    state = _state(model)
    previous = {name: getattr(state, name) for name in settings}
    for name, value in settings.items():
        setattr(state, name, value)
    try:
        yield model
    finally:
        for name, value in previous.items():
            setattr(state, name, value)
        if temporary:
            unpatch(model)


def forced_paths(model: nn.Module, paths, prefix=None):
    """Run forward calls and ``generate`` on the given paths, without routers.

    ``paths`` is ``[B, L]`` (one row per batch row) or a single path for all
    rows. An unpatched model is patched for the duration of the block.

    ``prefix=(states, sources)`` reuses work in cache-free forwards: ``states``
    are the hidden states entering each block on the default path (from
    :func:`block_states`) for some inputs, and row ``b`` of the batch is input
    ``sources[b]``. Each row then starts at its first block whose decision is
    not 1, from the stored state, instead of recomputing the shared blocks.
    """
    forced = as_paths(paths, describe(model).num_blocks)
    if prefix is not None:
        states, sources = prefix
        prefix = (states, torch.as_tensor(sources, dtype=torch.int64))
    return _patched(model, forced=forced, prefix=prefix)


def observe(model: nn.Module, fn):
    """Call ``fn(block, hidden)`` with the hidden state entering each block, during the block."""
    return _patched(model, observer=fn)


@torch.no_grad()
def block_states(model: nn.Module, **inputs) -> list[torch.Tensor]:
    """Hidden states entering each block when every block executes once (cache-free)."""
    states = [None] * describe(model).num_blocks
    with forced_paths(model, default_path(len(states))), observe(model, states.__setitem__):
        model(**inputs, use_cache=False)
    return states


def _prefill_call(state: RoutingState, batch: int, pool_mask: torch.Tensor, device) -> Call:
    L = state.num_blocks
    if state.forced is not None:
        decisions = as_paths(state.forced, L, batch)
        executed, inject = decisions, {}
        if state.prefix is not None:
            executed, inject = _prefix_plan(decisions, *state.prefix, device)
        plan = [plan_block(executed[:, i], device) for i in range(L)]
        return Call(decisions, plan, observer=state.observer, inject=inject)
    if state.routers is None:
        every = (PassPlan(ALL), PassPlan(0))
        return Call(torch.ones(batch, L, dtype=torch.int64), [every] * L, observer=state.observer)
    return Call(
        torch.zeros(batch, L, dtype=torch.int64),
        [None] * L,
        routers=state.routers,
        lam=state.lam,
        pool_mask=pool_mask,
        observer=state.observer,
    )


def _prefix_plan(decisions: torch.Tensor, states: list, sources: torch.Tensor, device):
    """Decisions to execute and states to inject so that each row starts at its first edit."""
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


def _routed_model_forward(base: nn.Module, original, state: RoutingState):
    signature = inspect.signature(original)
    name = cache_kwarg(original)

    def forward(*args, routing_mask: torch.Tensor | None = None, **kwargs):
        kwargs = dict(signature.bind_partial(*args, **kwargs).arguments)
        kwargs.update(kwargs.pop("kwargs", {}))
        if name != "past_key_values" and "past_key_values" in kwargs:  # the deprecated spelling
            legacy = kwargs.pop("past_key_values")
            if kwargs.get(name) is None:
                kwargs[name] = legacy
        tokens = kwargs.get("input_ids")
        if tokens is None:
            tokens = kwargs.get("inputs_embeds")
        if tokens is None:
            raise ValueError("You must specify input_ids or inputs_embeds")
        batch, length = tokens.shape[:2]
        if length == 0:
            raise ValueError("empty prompt: the input has no tokens")
        use_cache = kwargs.get("use_cache")
        if use_cache is None:
            use_cache = base.config.use_cache
        cache = kwargs.get(name)
        if isinstance(cache, RoutedCache) and cache.decisions is not None:
            if cache.decisions.shape[0] != batch:
                raise ValueError(f"the cache holds {cache.decisions.shape[0]} rows but the input has {batch}")
            call = Call(cache.decisions, cache.plan, observer=state.observer)
        else:
            if cache is not None and not isinstance(cache, RoutedCache):
                if cache.get_seq_length() > 0:
                    raise ValueError(
                        "the cache already holds tokens from an unrouted forward; start a routed model from an empty cache"
                    )
                cache = RoutedCache.like(cache, base.config, state.num_blocks)
            elif cache is None and use_cache:
                cache = RoutedCache.like(None, base.config, state.num_blocks)
            if state.prefix is not None and cache is not None:
                raise ValueError("prefix reuse is for cache-free forwards: pass use_cache=False")
            call = _prefill_call(state, batch, _pool_mask(kwargs.get("attention_mask"), routing_mask, batch, length, tokens.device), tokens.device)
        call.cache = cache
        if cache is not None:
            kwargs[name] = cache
        state.call = call
        try:
            out = original(**kwargs)
        finally:
            state.call = None
        if cache is not None:
            cache.decisions, cache.plan = call.decisions, call.plan
            cache.seen_tokens += length
        state.last = call.decisions
        return out

    return forward


def _pool_mask(attention_mask, routing_mask, batch: int, length: int, device) -> torch.Tensor:
    """The tokens routers pool over: ``routing_mask``, else the padding mask, else all."""
    mask = routing_mask
    if mask is None and isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2:
        mask = attention_mask
    if mask is None:
        return torch.ones(batch, length, dtype=torch.bool, device=device)
    if tuple(mask.shape) != (batch, length):
        raise ValueError(f"routing mask must have shape {(batch, length)} (batch, tokens), got {tuple(mask.shape)}")
    if not bool(mask.to(torch.bool).any(dim=1).all()):
        raise ValueError("empty prompt: a row of the batch has no real tokens (its attention mask is all zero)")
    return mask
