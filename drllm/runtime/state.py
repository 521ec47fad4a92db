"""What a patch adds to a model instance, and the per-caller settings of forced paths and observers.

The model keeps only its configuration (routers, lambda or budget, devices); every
forward call's own state is an :class:`~drllm.runtime.executor.Call`.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from ..routing import BudgetRouters, Routers
from .adapters import describe

STATE_ATTR = "_drllm_state"
ABSENT = object()  # marks an attribute the instance did not have before the patch


@dataclass
class RoutingState:
    """What the patch adds to a model instance: its configuration, not any call's state."""

    num_blocks: int
    routers: Routers | BudgetRouters | None = None
    lam: float = 0.0
    lam_rule: str = "shift"
    max_skip_run: int | None = 2
    budget: int | None = None  # blocks each row skips, with budget routers (None with per-block routers)
    devices: tuple = ()  # per block: its accelerate execution device, or None
    saved: list = field(default_factory=list)  # (module, attribute, instance value before the patch or ABSENT)
    local: threading.local = field(default_factory=threading.local)  # .last: decisions of this thread's last call
    compiled: object = None  # the blocks' class forward under torch.compile (drllm.compile), for decode steps
    borrowers: int = 0  # forced_paths/observe blocks using a temporary patch (0: patched by the user)

    def own_forward(self, module: nn.Module) -> bool:
        """Whether ``module`` had a forward of its own before the patch (e.g. an accelerate hook)."""
        return any(m is module and name == "forward" and before is not ABSENT for m, name, before in self.saved)


@dataclass(frozen=True)
class Settings:
    """Per-caller settings of :func:`drllm.forced_paths` and :func:`drllm.observe`, held in a context variable."""

    forced: torch.Tensor | None = None
    prefix: tuple | None = None  # (states entering each block on the default path, source row per row)
    observer: object = None


# id(state) -> (state, Settings): each thread (context) sees only the settings of its own `with` blocks.
_SETTINGS: ContextVar[dict] = ContextVar("drllm_settings", default={})


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


def state_of(model: nn.Module) -> RoutingState | None:
    return getattr(describe(model).base, STATE_ATTR, None)


def require_state(model: nn.Module) -> RoutingState:
    state = state_of(model)
    if state is None:
        raise RuntimeError("this model is not patched: call drllm.patch(model, routers) first")
    return state
