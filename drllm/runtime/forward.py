"""The patched model forward: one routing call per forward, its decisions returned with the output.

A forward that starts a sequence makes a new :class:`Call` (forced paths, all
execute, or routed block by block on the prompt); a forward given a routed
cache that holds decisions (or a caller's cache object with one attached)
continues that sequence on them. The call's decisions come back as
``out.paths`` on the patched model's output and on the top-level model's (a
CausalLM wraps the base model's output in its own).

Inside ``generate`` (:func:`generating`), routing pools over the prompt only,
never over the draft tokens that prompt lookup and assisted decoding append
to the first forward, and the prompt's decisions are kept for forwards that
recompute the whole sequence (``use_cache=False``).

The patched forwards are ``functools.partial`` objects over module functions,
holding the modules they call as arguments: a deep copy of a patched model
is a patched copy whose forwards run the copy.
"""

from __future__ import annotations

import functools
import inspect
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import torch
from torch import nn

from .. import ops
from ..paths import as_paths
from .adapters import cache_kwarg
from .cache import RoutedCache, attach, routed_cache
from .executor import Call, running
from .grouping import continue_step, model_step
from .plan import EVERY_ROW, prefix_plan
from .state import RoutingState, Settings, remember, settings_of

# The decisions of the routed forwards run inside one top-level call (see :func:`forward_with_paths`).
_DECIDED: ContextVar[list | None] = ContextVar("drllm_decided", default=None)


@dataclass
class Generation:
    """One ``generate`` call of a patched model: its prompt and the decisions frozen at its first forward."""

    owner: RoutingState
    prompt_length: int | None  # tokens of the prompt (the first forward may append drafts after them)
    prompt_batch: int | None  # prompts, before transformers repeats them for beams / num_return_sequences
    decisions: torch.Tensor | None = None


# id(state) -> Generation: the generate call of that model running in this context (thread, asyncio task).
_GENERATING: ContextVar[dict] = ContextVar("drllm_generating", default={})


@contextmanager
def generating(state: RoutingState, prompt_length: int | None, prompt_batch: int | None):
    """Mark this context's forwards of the model of ``state`` as one ``generate`` call's, for the block."""
    generation = Generation(state, prompt_length, prompt_batch)
    token = _GENERATING.set({**_GENERATING.get(), id(state): generation})
    try:
        yield generation
    finally:
        _GENERATING.reset(token)


def generation_of(state: RoutingState) -> Generation | None:
    generation = _GENERATING.get().get(id(state))
    return generation if generation is not None and generation.owner is state else None


def attach_paths(out, decisions: torch.Tensor):
    """``out`` (a transformers ModelOutput) with ``out.paths = decisions``; other outputs unchanged."""
    if hasattr(out, "keys") and hasattr(out, "to_tuple"):
        out["paths"] = decisions
    return out


@torch.compiler.disable
def forward_with_paths(forward, *args, **kwargs):
    """``forward``'s output carrying the decisions of the last routed forward it ran; an enclosing call gets them
    too."""
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


def prefill_call(state: RoutingState, settings: Settings, batch: int, pool_mask, device,
                 forced: torch.Tensor | None = None, generation: Generation | None = None) -> Call:
    """The call of a forward that starts a sequence: forced paths, all-execute, routed block by block, or routed
    at once at the budget routers' tap (the blocks before it run every row).

    ``forced`` defaults to the caller's forced paths. Inside ``generate``,
    one forced path per prompt is repeated for the rows transformers made of
    each prompt (beams, ``num_return_sequences``).
    """
    L = state.num_blocks
    forced = settings.forced if forced is None else forced
    common = dict(owner=state, observer=settings.observer, devices=state.devices)
    if forced is not None:
        decisions = as_paths(per_row(forced, batch, generation), L, batch)
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


def per_row(forced: torch.Tensor, batch: int, generation: Generation | None) -> torch.Tensor:
    """``forced`` with one path per prompt of a ``generate`` call repeated for that prompt's rows."""
    forced = torch.as_tensor(forced)
    rows = forced.shape[0] if forced.dim() == 2 else 1
    prompts = generation.prompt_batch if generation is not None else None
    if prompts and rows == prompts and rows not in (1, batch) and batch % rows == 0:
        return forced.repeat_interleave(batch // rows, dim=0)
    return forced


def routed_top_forward(top: nn.Module, base: nn.Module, state: RoutingState):
    """The patched top-level (CausalLM) forward: on a compiled model, a decode step of a batch on one frozen path
    runs as that path's whole-model graph, the head included (:func:`~.grouping.model_step`); every other call
    runs ``top``'s forward, its paths returned (:func:`forward_with_paths`)."""
    forward = top.forward
    return functools.update_wrapper(functools.partial(top_forward, top, base, state, forward), forward)


@torch.compiler.disable
def top_forward(top: nn.Module, base: nn.Module, state: RoutingState, forward, *args, **kwargs):
    if state.graphs is not None:
        out = _graph_step(top, base, state, args, kwargs)
        if out is not None:
            return out
    return forward_with_paths(forward, *args, **kwargs)


def _graph_step(top: nn.Module, base: nn.Module, state: RoutingState, args: tuple, kwargs: dict):
    """A decode step of ``top`` as a whole-model path graph, or None when it is not one."""
    kwargs = _bound(type(top), args, kwargs)
    _, name, _ = forward_signature(type(top))
    given = kwargs.get(name)
    cache = routed_cache(given) if given is not None else None
    tokens = kwargs.get("input_ids")
    tokens = tokens if tokens is not None else kwargs.get("inputs_embeds")
    if (cache is None or cache.decisions is None or tokens is None or tokens.shape[0] != cache.decisions.shape[0]
            or settings_of(state).observer is not None):
        return None
    kwargs[name] = cache
    out = model_step(top, base, state, cache, kwargs, name, tokens.shape[1])
    if out is None:
        return None
    cache.seen_tokens += tokens.shape[1]
    return _finished(state, out, cache.decisions)


def _finished(state: RoutingState, out, decisions: torch.Tensor):
    """``out`` of a forward that ran ``decisions``: remembered for :func:`drllm.last_paths`, given to an enclosing
    call, attached as ``out.paths``."""
    remember(state, decisions)
    decided = _DECIDED.get()
    if decided is not None:
        decided.append(decisions)
    return attach_paths(out, decisions)


@functools.lru_cache(maxsize=None)
def forward_signature(cls: type) -> tuple[inspect.Signature, str, str | None]:
    """The class's forward signature without ``self``, its cache keyword and its ``**kwargs`` name."""
    signature = inspect.signature(cls.forward)
    parameters = list(signature.parameters.values())[1:]
    var_kw = next((p.name for p in parameters if p.kind is inspect.Parameter.VAR_KEYWORD), None)
    return signature.replace(parameters=parameters), cache_kwarg(cls.forward), var_kw


def _bound(cls: type, args: tuple, kwargs: dict) -> dict:
    """A forward's arguments by name, per ``cls.forward``'s signature (an instance hook, e.g. accelerate's, may hide
    it), its ``**kwargs`` merged in."""
    signature, _, var_kw = forward_signature(cls)
    kwargs = dict(signature.bind_partial(*args, **kwargs).arguments)
    if var_kw is not None:
        kwargs.update(kwargs.pop(var_kw, {}))
    return kwargs


def routed_model_forward(base: nn.Module, original, state: RoutingState):
    """The patched model forward: one routing call per forward, run eagerly even inside a compiled caller."""
    return functools.partial(routed_forward, base, original, state)


@torch.compiler.disable
def routed_forward(base: nn.Module, original, state: RoutingState, *args,
                   routing_mask: torch.Tensor | None = None, **kwargs):
    kwargs = _bound(type(base), args, kwargs)
    _, name, _ = forward_signature(type(base))
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
    generation = generation_of(state)
    given = kwargs.get(name)
    cache = routed_cache(given) if given is not None else None
    continuing = cache is not None and cache.decisions is not None
    if continuing:  # continue the sequence on its frozen decisions
        if cache.decisions.shape[0] != batch:
            raise ValueError(f"the cache holds {cache.decisions.shape[0]} rows but the input has {batch}")
        check_attentions(kwargs, base.config, bool((cache.decisions == 1).all()))
        call = Call(owner=state, decisions=cache.decisions, plan=cache.plan, observer=settings.observer,
                    devices=state.devices)
    else:
        if given is not None and cache is None:  # the caller's own cache object: it must be empty
            if given.get_seq_length() > 0:
                raise ValueError(
                    "the cache already holds tokens from an unrouted forward; start a routed model from an empty cache"
                )
            cache = RoutedCache.like(given, base.config, state.num_blocks)
            attach(given, cache)  # given back next step, the caller's object continues this sequence
        elif given is None and use_cache:
            cache = RoutedCache.like(None, base.config, state.num_blocks)
        if settings.prefix is not None and cache is not None:
            raise ValueError("prefix reuse is for cache-free forwards: pass use_cache=False")
        forced = settings.forced
        if forced is None and generation is not None and generation.decisions is not None:
            forced = generation.decisions  # a whole sequence again (use_cache=False): the prompt's decisions
        check_attentions(kwargs, base.config, settings.prefix is None and (
            bool((forced == 1).all()) if forced is not None else state.routers is None or state.budget == 0))
        mask = kwargs.get("attention_mask")
        prompt = generation.prompt_length if generation is not None else None

        def routing_tokens():
            pooled = pool_mask(mask, routing_mask, batch, length, tokens.device)
            if prompt is not None and 0 < prompt < length:  # drafts after the prompt never reach the routers
                pooled = pooled.clone()
                pooled[:, prompt:] = 0
                ops.require_real_tokens(pooled)
            return pooled

        call = prefill_call(state, settings, batch, routing_tokens, tokens.device, forced, generation)
    call.cache = cache
    if cache is not None:
        kwargs[name] = cache
    if continuing:  # a decode step: grouped by path, a path's whole-step graph, or the executor
        out = continue_step(base, original, state, call, kwargs, name, length)
    else:
        with running(call):
            out = original(**kwargs)
    if cache is not None:
        cache.decisions, cache.plan = call.decisions, call.plan
        cache.seen_tokens += length
    if generation is not None and generation.decisions is None:
        generation.decisions = call.decisions
    return _finished(state, out, call.decisions)


def check_attentions(kwargs: dict, config, every_block_once: bool) -> None:
    """Refuse ``output_attentions`` unless every row runs every block once (then it is transformers' own)."""
    wanted = kwargs.get("output_attentions")
    if wanted is None:
        wanted = getattr(config, "output_attentions", False)
    if wanted and not every_block_once:
        raise ValueError(
            "output_attentions=True is refused on a routed path: a row runs each block 0, 1 or 2 times, so there "
            "is no one attention map per block in transformers' layout. Ask for attentions on the default path "
            "(drllm.forced_paths(model, [1] * num_blocks)) or on the unpatched model; output_hidden_states works "
            "(one entry per block: each row's hidden state after that block on its path)"
        )


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
