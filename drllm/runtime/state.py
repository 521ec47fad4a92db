"""What a patch adds to a model instance, and the per-caller settings of forced paths and observers.

The model keeps only its configuration (routers, lambda or budget, devices); every
forward call's own state is an :class:`~drllm.runtime.executor.Call`, and what a
caller reads back (:func:`remember` / :func:`remembered`, behind ``drllm.last_paths``)
is context-local: per thread and per asyncio task.
"""

from __future__ import annotations

import copy
import weakref
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field, fields, replace

import torch
from torch import nn

from ..routing import BudgetRouters, Routers
from .adapters import describe

STATE_ATTR = "_drllm_state"


class _Absent:
    """Marks an attribute the instance did not have before the patch; copies of a model keep the one marker."""

    def __repr__(self) -> str:
        return "ABSENT"

    def __reduce__(self):
        return "ABSENT"  # copy and pickle by reference: deepcopy returns the marker itself


ABSENT = _Absent()


@dataclass
class RoutingState:
    """What the patch adds to a model instance: its configuration, not any call's state.

    A deep copy of a patched model copies it with the model (the patched
    forwards hold the model's modules and this state as arguments, so the
    copy's forwards run the copy's weights and routers).
    """

    num_blocks: int
    routers: Routers | BudgetRouters | None = None
    lam: float = 0.0
    lam_rule: str = "shift"
    max_skip_run: int | None = 2
    budget: int | None = None  # blocks each row skips, with budget routers (None with per-block routers)
    devices: tuple = ()  # per block: its accelerate execution device, or None
    saved: list = field(default_factory=list)  # (module, attribute, instance value before the patch or ABSENT)
    compiled: object = None  # the blocks' class forward under torch.compile (drllm.compile), for decode steps
    graphs: object = None  # whole-step graphs per (path, batch) (drllm.compile, path_graphs.PathGraphs), or None
    borrowers: int = 0  # forced_paths/observe blocks using a temporary patch (0: patched by the user)

    def own_forward(self, module: nn.Module) -> bool:
        """Whether ``module`` had a forward of its own before the patch (e.g. an accelerate hook)."""
        return any(m is module and name == "forward" and before is not ABSENT for m, name, before in self.saved)

    def __deepcopy__(self, memo):
        copied = object.__new__(type(self))
        memo[id(self)] = copied
        for f in fields(self):
            setattr(copied, f.name, copy.deepcopy(getattr(self, f.name), memo))
        copied.borrowers = 0  # the copy stays patched until its owner unpatches it
        return copied


@dataclass(frozen=True)
class Settings:
    """Per-caller settings of :func:`drllm.forced_paths` and :func:`drllm.observe`, held in a context variable."""

    forced: torch.Tensor | None = None
    prefix: tuple | None = None  # (states entering each block on the default path, source row per row)
    observer: object = None


# id(state) -> (state, Settings): each thread (context) sees only the settings of its own `with` blocks.
_SETTINGS: ContextVar[dict] = ContextVar("drllm_settings", default={})
# id(state) -> (weak reference to the state, decisions of this context's last call of that model).
_LAST: ContextVar[dict] = ContextVar("drllm_last_paths", default={})


def settings_of(state: RoutingState) -> Settings:
    """The settings this caller applied to the model of ``state`` (defaults when none)."""
    entry = _SETTINGS.get().get(id(state))
    return entry[1] if entry is not None and entry[0] is state else Settings()


@contextmanager
def applied(state: RoutingState, **settings):
    """Apply ``settings`` to this caller's forward calls of the model of ``state`` for the block."""
    current = _SETTINGS.get()
    token = _SETTINGS.set({**current, id(state): (state, replace(settings_of(state), **settings))})
    try:
        yield
    finally:
        _SETTINGS.reset(token)


def remember(state: RoutingState, decisions: torch.Tensor) -> None:
    """Record ``decisions`` as this context's last call of the model of ``state`` (per thread, per asyncio task)."""
    kept = {key: entry for key, entry in _LAST.get().items() if entry[0]() is not None and key != id(state)}
    kept[id(state)] = (weakref.ref(state), decisions)
    _LAST.set(kept)  # a new dict: contexts copied from this one keep their own


def remembered(state: RoutingState) -> torch.Tensor | None:
    """The decisions of this context's last call of the model of ``state``, or None."""
    entry = _LAST.get().get(id(state))
    return entry[1] if entry is not None and entry[0]() is state else None


def state_of(model: nn.Module) -> RoutingState | None:
    return getattr(describe(model).base, STATE_ATTR, None)


def require_state(model: nn.Module) -> RoutingState:
    state = state_of(model)
    if state is None:
        raise RuntimeError("this model is not patched: call drllm.patch(model, routers) first")
    return state
