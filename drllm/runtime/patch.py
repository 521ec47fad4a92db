"""Retrofitting a loaded model instance: patch, unpatch, forced paths."""

from __future__ import annotations

import inspect
import threading
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from .. import ops
from ..paths import as_paths, default_path
from ..routers import Routers
from .adapters import cache_kwarg, describe, dispatched_device
from .cache import RoutedCache
from .executor import ALL, LAM_RULES, Call, PassPlan, running, routed_block

STATE_ATTR = "_drllm_state"
_ABSENT = object()  # marks an attribute the instance did not have before the patch
_RECOMPILE_LIMIT = 64
_PATCH_LOCK = threading.Lock()  # temporary patches made by forced_paths/observe from several threads


@dataclass
class RoutingState:
    """What the patch adds to a model instance: its configuration, not any call's state."""

    num_blocks: int
    routers: Routers | None = None
    lam: float = 0.0
    lam_rule: str = "shift"
    max_skip_run: int | None = 2
    devices: tuple = ()  # per block: its accelerate execution device, or None
    saved: list = field(default_factory=list)  # (module, attribute, instance value before the patch or _ABSENT)
    local: threading.local = field(default_factory=threading.local)  # .last: decisions of this thread's last call
    compiled: object = None  # the blocks' class forward under torch.compile (drllm.compile), for decode steps
    borrowers: int = 0  # forced_paths/observe blocks using a temporary patch (0: patched by the user)


@dataclass(frozen=True)
class Settings:
    """Per-caller settings of :func:`forced_paths` and :func:`observe`, held in a context variable."""

    forced: torch.Tensor | None = None
    prefix: tuple | None = None  # (states entering each block on the default path, source row per row)
    observer: object = None


# id(state) -> (state, Settings): each thread (context) sees only the settings of its own `with` blocks.
_SETTINGS: ContextVar[dict] = ContextVar("drllm_settings", default={})


def _settings(state: RoutingState) -> Settings:
    entry = _SETTINGS.get().get(id(state))
    return entry[1] if entry is not None and entry[0] is state else Settings()


def _state(model: nn.Module) -> RoutingState | None:
    return getattr(describe(model).base, STATE_ATTR, None)


def is_patched(model: nn.Module) -> bool:
    return _state(model) is not None


def _require_state(model: nn.Module) -> RoutingState:
    state = _state(model)
    if state is None:
        raise RuntimeError("this model is not patched: call drllm.patch(model, routers) first")
    return state


def _check_lam(lam: float, rule: str) -> tuple[float, str]:
    lam = float(lam)
    if not -1.0 <= lam <= 1.0:
        raise ValueError(f"lam must be in [-1, 1] (negative favours skipping, positive repeating), got {lam}")
    if rule not in LAM_RULES:
        raise ValueError(f"unknown lam rule {rule!r}; expected one of {LAM_RULES}")
    return lam, rule


def _replace(state: RoutingState, module: nn.Module, name: str, value) -> None:
    """Set an instance attribute, remembering exactly what was there (accelerate hooks live there too)."""
    state.saved.append((module, name, module.__dict__.get(name, _ABSENT)))
    setattr(module, name, value)


def patch(model: nn.Module, routers: Routers | None = None, lam: float = 0.0, lam_rule: str = "shift",
          max_skip_run: int | None = 2) -> nn.Module:
    """Route ``model`` (a loaded HF decoder model) in place and return it.

    Each row's path is decided once, on the prompt, by ``routers`` (or set by
    :func:`forced_paths`); without routers every block executes once.
    ``lam`` in [-1, 1] moves decisions towards skip or repeat (see
    :func:`drllm.runtime.executor.choose` for ``lam_rule``). Routed paths keep
    the search's constraint: no more than ``max_skip_run`` consecutive skipped
    blocks (None lifts it; forced paths are never changed). Works on models
    dispatched with accelerate: each router runs on its block's device.
    :func:`unpatch` restores the instance exactly.
    """
    info = describe(model)
    base = info.base
    if getattr(base, STATE_ATTR, None) is not None:
        raise RuntimeError("this model is already patched: call drllm.unpatch(model) before patching it again")
    lam, lam_rule = _check_lam(lam, lam_rule)
    if max_skip_run is not None and (not isinstance(max_skip_run, int) or max_skip_run < 0):
        raise ValueError(f"max_skip_run must be a count of blocks >= 0 or None, got {max_skip_run!r}")
    devices = tuple(dispatched_device(layer) for layer in base.layers)
    if routers is not None:
        routers.check_compatible(info.model_type, info.hidden_size, info.num_blocks)
        for mlp, device in zip(routers.mlps, devices):
            mlp.to(device or info.device)
    state = RoutingState(info.num_blocks, routers, lam, lam_rule, max_skip_run, devices if any(devices) else ())
    for i, layer in enumerate(base.layers):
        _replace(state, layer, "forward", routed_block(layer, i, state, cache_kwarg(type(layer).forward)))
    _replace(state, base, "forward", _routed_model_forward(base, base.forward, state))
    if model is not base and hasattr(model, "prepare_inputs_for_generation"):
        _replace(state, model, "prepare_inputs_for_generation", _with_routing_mask(model.prepare_inputs_for_generation))
        _replace(state, model, "generate", _refusing_chunked_prefill(model, model.generate))
    setattr(base, STATE_ATTR, state)
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Undo :func:`patch`: every attribute the patch set is restored to what the instance had."""
    base = describe(model).base
    state = _require_state(model)
    for module, name, before in reversed(state.saved):
        if before is _ABSENT:
            delattr(module, name)  # exposes the class's method again
        else:
            setattr(module, name, before)  # e.g. an accelerate hook's forward
    delattr(base, STATE_ATTR)
    return model


def compile(model: nn.Module, **options) -> nn.Module:
    """Compile the decoder blocks of a patched ``model`` for decoding (regional compilation); returns it.

    One ``torch.compile`` of the block class's ``forward`` serves every block,
    pass and path: parameters and cache slots are inputs of the graph, so the
    graphs compiled depend on the batch and cache kinds, never on the paths
    (there are 3^L of them), and a prompt with a new path compiles nothing.
    Decode steps run the compiled blocks; the prefill (whole prompts of any
    length, and the routers) and the routing between blocks stay eager.
    ``options`` go to ``torch.compile`` (e.g. ``mode="reduce-overhead"`` for
    CUDA graphs). Compiling the whole model (``torch.compile(model.forward)``,
    or transformers' own compilation for static caches) also works: the
    routed forward is left to run eagerly inside it.
    """
    state = _require_state(model)
    layers = describe(model).base.layers
    hooked = [i for i, layer in enumerate(layers) for module, name, before in state.saved
              if module is layer and name == "forward" and before is not _ABSENT]  # fmt: skip
    if hooked:
        raise ValueError(
            f"blocks {hooked} have their own forward (accelerate hooks?): drllm.compile compiles the block class's "
            "forward and would bypass them; compile a model that is not dispatched with accelerate"
        )
    if len({type(layer) for layer in layers}) != 1:
        raise ValueError("drllm.compile needs every decoder block to be of one class")
    # Every model compiled this way shares one code object (_decode_block), and with it dynamo's
    # limit on recompilations (per batch size class, mask kind and cache kind): leave room for them.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, _RECOMPILE_LIMIT)
    state.compiled = torch.compile(_decode_block, **{"fullgraph": True, **options})
    return model


def _decode_block(layer: nn.Module, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """One block pass, as compiled by :func:`compile`: a code object of drllm's own, so that its compiled
    graphs never share dynamo's cache (and recompile limit) with other compilations of the block class."""
    return type(layer).forward(layer, hidden_states, *args, **kwargs)


def set_lam(model: nn.Module, lam: float, rule: str | None = None) -> None:
    """Change the control knob of a patched model (and, optionally, its rule: ``shift`` or ``mix``)."""
    state = _require_state(model)
    state.lam, state.lam_rule = _check_lam(lam, rule or state.lam_rule)


def last_paths(model: nn.Module) -> torch.Tensor:
    """The ``[B, L]`` decisions used by this thread's last forward call (or generation) of ``model``."""
    last = getattr(_require_state(model).local, "last", None)
    if last is None:
        raise RuntimeError("no routed forward call has run on this model in this thread yet")
    return last.clone()


@contextmanager
def _borrowed(model: nn.Module):
    """The model's routing state, patching it for the duration of the block if it is not patched."""
    with _PATCH_LOCK:
        state = _state(model)
        borrowing = state is None or state.borrowers > 0
        if state is None:
            patch(model)
            state = _state(model)
        state.borrowers += borrowing
    try:
        yield state
    finally:
        if borrowing:
            with _PATCH_LOCK:
                state.borrowers -= 1
                if state.borrowers == 0:
                    unpatch(model)


@contextmanager
def _patched(model: nn.Module, **settings):
    """Apply ``settings`` to this caller's forward calls of ``model`` for the duration of the block."""
    with _borrowed(model) as state:
        current = _SETTINGS.get()
        token = _SETTINGS.set({**current, id(state): (state, replace(_settings(state), **settings))})
        try:
            yield model
        finally:
            _SETTINGS.reset(token)


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


def _prefill_call(state: RoutingState, settings: Settings, batch: int, pool_mask, device) -> Call:
    """The call of a forward that starts a sequence: forced paths, all-execute, or routed block by block."""
    L = state.num_blocks
    common = dict(owner=state, observer=settings.observer, devices=state.devices)
    if settings.forced is not None:
        decisions = as_paths(settings.forced, L, batch)
        executed, inject = decisions, {}
        if settings.prefix is not None:
            executed, inject = _prefix_plan(decisions, *settings.prefix, device)
        call = Call(decisions=decisions, plan=[], inject=inject, **common)
        devices = state.devices or (None,) * L
        call.plan = [call.plan_rows(executed[:, i], devices[i] or device) for i in range(L)]
        return call
    if state.routers is None:
        every = (PassPlan(ALL), PassPlan(0))
        return Call(decisions=torch.ones(batch, L, dtype=torch.int64), plan=[every] * L, **common)
    return Call(
        decisions=torch.zeros(batch, L, dtype=torch.int64),
        plan=[None] * L,
        routers=state.routers,
        lam=state.lam,
        lam_rule=state.lam_rule,
        max_skip_run=state.max_skip_run,
        pool_mask=pool_mask(),
        **common,
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
        settings = _settings(state)
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
            call = _prefill_call(
                state, settings, batch, lambda: _pool_mask(mask, routing_mask, batch, length, tokens.device), tokens.device
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
        return out

    return torch.compiler.disable(forward)


def _pool_mask(attention_mask, routing_mask, batch: int, length: int, device) -> torch.Tensor:
    """The tokens routers pool over: ``routing_mask``, else the 2D padding mask, else all (no mask at all).

    A 4D (or per-layer-type dict) mask is never read as "all tokens": it is
    refused, since padding cannot be told from it reliably; ``generate``
    passes the 2D mask as ``routing_mask`` itself (see :func:`_with_routing_mask`).
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


def _with_routing_mask(prepare):
    """``prepare_inputs_for_generation`` that also passes the 2D padding mask of the new tokens as ``routing_mask``.

    transformers turns the 2D mask into a 4D one before the forward for
    compileable (static) caches; the routers still need to know the padding.
    """
    signature = inspect.signature(prepare)

    def prepare_inputs_for_generation(*args, **kwargs):
        inputs = prepare(*args, **kwargs)
        mask = signature.bind_partial(*args, **kwargs).arguments.get("attention_mask")
        if mask is None:
            mask = kwargs.get("attention_mask")
        tokens = inputs.get("input_ids")
        if tokens is None:
            tokens = inputs.get("inputs_embeds")
        if inputs.get("routing_mask") is None and isinstance(mask, torch.Tensor) and mask.dim() == 2 and tokens is not None:
            inputs["routing_mask"] = mask[:, mask.shape[1] - tokens.shape[1]:]
        return inputs

    return prepare_inputs_for_generation


def _refusing_chunked_prefill(model: nn.Module, generate):
    """``generate`` that refuses chunked prefill: routing decides once on the whole prompt, not on its first chunk."""
    signature = inspect.signature(generate)

    def routed_generate(*args, **kwargs):
        config = signature.bind_partial(*args, **kwargs).arguments.get("generation_config") or model.generation_config
        size = kwargs.get("prefill_chunk_size", getattr(config, "prefill_chunk_size", None))
        if size is not None:
            raise ValueError(
                f"prefill_chunk_size={size}: a routed model decides each row's path once on the whole prompt, "
                "so it cannot prefill in chunks; call generate without prefill_chunk_size"
            )
        return generate(*args, **kwargs)

    return routed_generate
