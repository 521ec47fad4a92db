"""What a caller sets and reads on a (possibly unpatched) model: forced paths, observers, lambda, budget, last
paths.

Settings are context-local (a ``with`` block applies to this caller's calls
only); a model that is not patched is patched for the duration of the block
and unpatched after, reference-counted across threads.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager

import torch
from torch import nn

from ..paths import as_paths, default_path
from ..routing import check_lam
from .adapters import describe
from .patch import check_routing, patch, unpatch
from .state import applied, remembered, require_state, state_of

_PATCH_LOCK = threading.Lock()  # temporary patches made by forced_paths/observe from several threads


def set_lam(model: nn.Module, lam: float, rule: str | None = None) -> None:
    """Change the control knob of a patched model (and, optionally, its rule: ``shift`` or ``mix``)."""
    state = require_state(model)
    lam, rule = check_lam(lam, rule or state.lam_rule)
    check_routing(state.routers, lam, state.budget)
    state.lam, state.lam_rule = lam, rule


def set_budget(model: nn.Module, budget: int) -> None:
    """Change how many blocks every row skips on a model patched with budget routers (0: vanilla)."""
    state = require_state(model)
    budget = check_routing(state.routers, state.lam, budget)
    state.budget = state.routers.check_budget(budget)


def last_paths(model: nn.Module) -> torch.Tensor:
    """The ``[B, L]`` decisions used by the caller's last forward call of ``model``.

    Per caller: per thread and per asyncio task (a context variable), so
    concurrent callers never read each other's decisions. A convenience: each
    call's own decisions come back with its output (``out.paths``, and
    ``generate(..., return_dict_in_generate=True).paths``), which is what a
    server should use.
    """
    last = remembered(require_state(model))
    if last is None:
        raise RuntimeError("no routed forward call of this model has run in this thread or task yet "
                           "(its decisions also come back with each output: out.paths)")
    return last.clone()


@contextmanager
def _borrowed(model: nn.Module):
    """The model's routing state, patching it for the duration of the block if it is not patched."""
    with _PATCH_LOCK:
        state = state_of(model)
        borrowing = state is None or state.borrowers > 0
        if state is None:
            patch(model)
            state = state_of(model)
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
    with _borrowed(model) as state, applied(state, **settings):
        yield model


def forced_paths(model: nn.Module, paths, prefix=None):
    """Run forward calls and ``generate`` on the given paths, without routers.

    ``paths`` is ``[B, L]`` (one row per batch row) or a single path for all
    rows; any other count is refused when the forward runs. In ``generate``,
    one path per prompt also works: transformers repeats each prompt for its
    beams and ``num_return_sequences``, and the paths follow. An unpatched
    model is patched for the duration of the block.

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
