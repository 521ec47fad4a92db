"""Installing and removing the routed wrappers on a loaded model instance (reversibly)."""

from __future__ import annotations

from torch import nn

from ..routing import BudgetRouters, Routers, check_lam
from ..routing.decide import check_max_skip_run
from .adapters import cache_kwarg, describe, dispatched_device, unwrap
from .executor import routed_block
from .forward import routed_model_forward, routed_top_forward
from .generation import routed_generate, with_routing_mask
from .state import ABSENT, STATE_ATTR, RoutingState, require_state, state_of


def _replace(state: RoutingState, module: nn.Module, name: str, value) -> None:
    """Set an instance attribute, remembering exactly what was there (accelerate hooks live there too)."""
    state.saved.append((module, name, module.__dict__.get(name, ABSENT)))
    setattr(module, name, value)


def patch(model: nn.Module, routers: Routers | BudgetRouters | None = None, lam: float = 0.0, lam_rule: str = "shift",
          max_skip_run: int | None = 2, budget: int | None = None) -> nn.Module:
    """Route ``model`` (a loaded HF decoder model) in place and return it.

    Each row's path is decided once, on the prompt, by ``routers`` (or set by
    :func:`drllm.forced_paths`); without routers every block executes once.
    ``lam`` in [-1, 1] moves decisions towards skip or repeat (see
    :func:`drllm.routing.choose` for ``lam_rule``). Routed paths keep the
    search's constraint: no more than ``max_skip_run`` consecutive skipped
    blocks (None lifts it; forced paths are never changed). With
    :class:`~drllm.routing.BudgetRouters`, ``budget=K`` is required instead of
    ``lam``: every row skips exactly K blocks, chosen once at the routers' tap
    block under their own skip-run limit (K = 0 is vanilla;
    :func:`drllm.set_budget` changes it). Works on models
    dispatched with accelerate: each router runs on its block's device.
    Forward outputs carry the call's decisions as ``out.paths``. A PEFT
    (e.g. LoRA) wrapper is patched through to the model it wraps. A deep copy
    of the patched model is patched too (its own routers and state).
    :func:`unpatch` restores the instance exactly.
    """
    info = describe(model)
    base = info.base
    if getattr(base, STATE_ATTR, None) is not None:
        raise RuntimeError("this model is already patched: call drllm.unpatch(model) before patching it again")
    lam, lam_rule = check_lam(lam, lam_rule)
    check_max_skip_run(max_skip_run)
    devices = tuple(dispatched_device(layer) for layer in base.layers)
    budget = check_routing(routers, lam, budget)
    if routers is not None:
        routers.check_compatible(info.model_type, info.hidden_size, info.num_blocks)
    if budget is not None:
        budget = routers.check_budget(budget)
        routers.to(devices[routers.tap] or info.device)
    elif routers is not None:
        for mlp, device in zip(routers.mlps, devices):
            mlp.to(device or info.device)
    state = RoutingState(info.num_blocks, routers, lam, lam_rule, max_skip_run, budget, devices if any(devices) else ())
    for i, layer in enumerate(base.layers):
        _replace(state, layer, "forward", routed_block(layer, i, state, cache_kwarg(type(layer).forward)))
    _replace(state, base, "forward", routed_model_forward(base, base.forward, state))
    top = unwrap(model)  # a PEFT wrapper calls the transformers model's forward and generate
    if top is not base:
        _replace(state, top, "forward", routed_top_forward(top, base, state))
        if hasattr(top, "prepare_inputs_for_generation"):
            _replace(state, top, "prepare_inputs_for_generation", with_routing_mask(top.prepare_inputs_for_generation))
            _replace(state, top, "generate", routed_generate(top, top.generate, state))
    setattr(base, STATE_ATTR, state)
    return model


def check_routing(routers, lam: float, budget) -> int | None:
    """The budget, None for per-block routers: budget routers take a budget and no lam, per-block routers the
    reverse (one-line ValueErrors saying which knob goes with which routers)."""
    if isinstance(routers, BudgetRouters):
        if budget is None:
            raise ValueError("budget routers need a budget: drllm.patch(model, routers, budget=K) skips K blocks "
                             "per row")
        if lam != 0:
            raise ValueError(f"lam={lam} moves per-block routers; budget routers skip exactly budget=K blocks per row")
        return budget
    if budget is not None:
        raise ValueError(f"budget={budget} needs budget routers (drllm.routing.BudgetRouters); "
                         "per-block Routers are moved with lam instead")
    return None


def unpatch(model: nn.Module) -> nn.Module:
    """Undo :func:`patch`: every attribute the patch set is restored to what the instance had."""
    base = describe(model).base
    state = require_state(model)
    for module, name, before in reversed(state.saved):
        if before is ABSENT:
            delattr(module, name)  # exposes the class's method again
        else:
            setattr(module, name, before)  # e.g. an accelerate hook's forward
    delattr(base, STATE_ATTR)
    return model


def is_patched(model: nn.Module) -> bool:
    return state_of(model) is not None
