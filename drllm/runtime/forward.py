"""The patched model forward: one routing call per forward, its decisions returned with the output.

A forward that starts a sequence makes a new :class:`Call` (forced paths, all
execute, or routed block by block on the prompt); a forward given a routed
cache that holds decisions continues that sequence on them. The call's
decisions come back as ``out.paths`` on the patched model's output and on the
top-level model's (a CausalLM wraps the base model's output in its own).
"""

from __future__ import annotations

import functools
import inspect
from contextvars import ContextVar

import torch
from torch import nn

from .. import ops
from ..paths import as_paths
from .adapters import cache_kwarg
from .cache import RoutedCache
from .executor import Call, running
from .plan import EVERY_ROW, prefix_plan
from .state import RoutingState, Settings, settings_of

# The decisions of the routed forwards run inside one top-level call (see :func:`with_paths`).
_DECIDED: ContextVar[list | None] = ContextVar("drllm_decided", default=None)


def attach_paths(out, decisions: torch.Tensor):
    """``out`` (a transformers ModelOutput) with ``out.paths = decisions``; other outputs unchanged."""
    if hasattr(out, "keys") and hasattr(out, "to_tuple"):
        out["paths"] = decisions
    return out


def with_paths(forward):
    """A top-level ``forward`` (or ``generate``) whose output carries the decisions of the last routed forward
    it ran; an enclosing call gets them too."""

    @functools.wraps(forward)  # transformers reads the forward's signature (e.g. generate's kwarg check)
    def forward_with_paths(*args, **kwargs):
        outer, decided = _DECIDED.get(), []
        token = _DECIDED.set(decided)
        try:
            out = forward(*args, **kwargs)
        finally:
            _DECIDED.reset(token)
        if not decided:
            return out
        if outer is not None:  # e.g. generate around the model's forward
            outer.append(decided[-1])
        return attach_paths(out, decided[-1])

    return torch.compiler.disable(forward_with_paths)


def prefill_call(state: RoutingState, settings: Settings, batch: int, pool_mask, device) -> Call:
    """The call of a forward that starts a sequence: forced paths, all-execute, routed block by block, or routed
    at once at the budget routers' tap (the blocks before it run every row)."""
    L = state.num_blocks
    common = dict(owner=state, observer=settings.observer, devices=state.devices)
    if settings.forced is not None:
        decisions = as_paths(settings.forced, L, batch)
        executed, inject = decisions, {}
        if settings.prefix is not None:
            executed, inject = prefix_plan(decisions, *settings.prefix, device)
        call = Call(decisions=decisions, plan=[], inject=inject, **common)
        devices = state.devices or (None,) * L
        call.plan = [call.plan_rows(executed[:, i], devices[i] or device) for i in range(L)]
        return call
    if state.routers is None or state.budget == 0:
        return Call(decisions=torch.ones(batch, L, dtype=torch.int64), plan=[EVERY_ROW] * L, **common)
    tap = 0 if state.budget is None else state.routers.tap
    return Call(
        decisions=torch.ones(batch, L, dtype=torch.int64),
        plan=[EVERY_ROW] * tap + [None] * (L - tap),
        routers=state.routers,
        lam=state.lam,
        lam_rule=state.lam_rule,
        max_skip_run=state.max_skip_run,
        budget=state.budget,
        pool_mask=pool_mask(),
        **common,
    )


def routed_model_forward(base: nn.Module, original, state: RoutingState):
    """The patched model forward: one routing call per forward, run eagerly even inside a compiled caller."""
    signature = inspect.signature(type(base).forward.__get__(base))  # the class's: an instance hook may hide it
    name = cache_kwarg(type(base).forward)

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
        settings = settings_of(state)
        cache = kwargs.get(name)
        if isinstance(cache, RoutedCache) and cache.decisions is not None:
            if cache.decisions.shape[0] != batch:
                raise ValueError(f"the cache holds {cache.decisions.shape[0]} rows but the input has {batch}")
            call = Call(owner=state, decisions=cache.decisions, plan=cache.plan, observer=settings.observer,
                        devices=state.devices)
        else:
            if cache is not None and not isinstance(cache, RoutedCache):
                if cache.get_seq_length() > 0:
                    raise ValueError(
                        "the cache already holds tokens from an unrouted forward; start a routed model from an empty cache"
                    )
                cache = RoutedCache.like(cache, base.config, state.num_blocks)
            elif cache is None and use_cache:
                cache = RoutedCache.like(None, base.config, state.num_blocks)
            if settings.prefix is not None and cache is not None:
                raise ValueError("prefix reuse is for cache-free forwards: pass use_cache=False")
            mask = kwargs.get("attention_mask")
            call = prefill_call(
                state, settings, batch, lambda: pool_mask(mask, routing_mask, batch, length, tokens.device), tokens.device
            )
        call.cache = cache
        if cache is not None:
            kwargs[name] = cache
        with running(call):
            out = original(**kwargs)
        if cache is not None:
            cache.decisions, cache.plan = call.decisions, call.plan
            cache.seen_tokens += length
        state.local.last = call.decisions
        decided = _DECIDED.get()
        if decided is not None:
            decided.append(call.decisions)
        return attach_paths(out, call.decisions)

    return torch.compiler.disable(forward)


def pool_mask(attention_mask, routing_mask, batch: int, length: int, device) -> torch.Tensor:
    """The tokens routers pool over: ``routing_mask``, else the 2D padding mask, else all (no mask at all).

    A 4D (or per-layer-type dict) mask is never read as "all tokens": it is
    refused, since padding cannot be told from it reliably; ``generate``
    passes the 2D mask as ``routing_mask`` itself
    (:func:`drllm.runtime.generation.with_routing_mask`).
    """
    mask = routing_mask
    if mask is None and attention_mask is not None:
        if not (isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2):
            raise ValueError(
                "the routers need the prompt's 2D padding mask [batch, tokens], but the attention mask is "
                f"{_describe_mask(attention_mask)}: pass routing_mask=<the 2D mask> with it"
            )
        mask = attention_mask
    if mask is None:
        return torch.ones(batch, length, dtype=torch.bool, device=device)
    if tuple(mask.shape) != (batch, length):
        raise ValueError(f"routing mask must have shape {(batch, length)} (batch, tokens), got {tuple(mask.shape)}")
    ops.require_real_tokens(mask)
    return mask


def _describe_mask(mask) -> str:
    if isinstance(mask, torch.Tensor):
        return f"{mask.dim()}D {tuple(mask.shape)}"
    return type(mask).__name__
