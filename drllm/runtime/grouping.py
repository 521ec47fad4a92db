"""Decode steps that continue a routed cache: rows grouped by path, whole-step graphs, or the shared executor.

A batch whose rows follow different paths runs, in the shared executor, the
union of their (block, pass) pairs: a repeat in one row costs a whole block
pass. Grouping runs the rows of each frequent path as a batch of their own
instead, on a routed cache of their own (:meth:`RoutedCache.rows`), each
group on its path's whole-step graph when :func:`drllm.compile` made them
(:mod:`.path_graphs`), else on the executor; the rows of rare paths stay
together on the executor (gather/scatter). Whether a path's rows are
frequent enough is a measured policy, like the row policy
(:class:`GroupPolicy`; ``drllm bench`` suite ``grouping`` places the
crossover). The split is decided once per sequence, at its first decode
step (none under an observer, which sees every row at each block), and kept
on the cache; row operations (beams) map through the groups.
"""

from __future__ import annotations

import os
from contextvars import ContextVar
from dataclasses import dataclass

import torch

from .cache import Group, RoutedCache
from .executor import Call, running
from .path_graphs import PathCache, child_name, fixed_slots

# A path whose rows number at least this (per device type) runs as a group of its own; the other rows run together
# on the executor. From `drllm bench --suites grouping` (benchmarks/RESULTS.md).
MIN_ROWS = (("cpu", 2), ("cuda", 2))


@dataclass(frozen=True)
class GroupPolicy:
    """Which rows of a batch run as a group of their own (see the module docstring); ``enabled=False``: never."""

    enabled: bool = True
    min_rows: tuple = MIN_ROWS  # (device type, rows) pairs

    def threshold(self, device: torch.device) -> int:
        rows = dict(self.min_rows)
        return rows.get(device.type, rows["cuda"])


def _env_policy() -> GroupPolicy:
    value = os.environ.get("DRLLM_GROUPING", "auto").strip().lower()
    return GroupPolicy(enabled=value not in ("0", "off", "false", "no"))


# Context-local (per thread, per asyncio task), as the row policy: a caller's choice never changes another's forward.
_POLICY: ContextVar[GroupPolicy] = ContextVar("drllm_group_policy", default=_env_policy())


def set_group_policy(enabled: bool | None = None, min_rows: int | None = None) -> GroupPolicy:
    """Turn grouping on or off and/or set the rows a path needs to run as a group (every device type), in this
    thread (context); returns the previous setting. Affects sequences whose first decode step comes after."""
    previous = _POLICY.get()
    thresholds = previous.min_rows
    if min_rows is not None:
        if min_rows < 1:
            raise ValueError(f"min_rows must be >= 1, got {min_rows}")
        thresholds = tuple((device, int(min_rows)) for device, _ in thresholds)
    _POLICY.set(GroupPolicy(previous.enabled if enabled is None else bool(enabled), thresholds))
    return previous


def restore_group_policy(previous: GroupPolicy) -> None:
    """Undo :func:`set_group_policy` with the value it returned."""
    _POLICY.set(previous)


def plan_groups(decisions: torch.Tensor, min_rows: int) -> list[tuple[torch.Tensor, tuple | None]]:
    """``(rows, path)`` of each group of a ``[B, L]`` batch: one per path taken by at least ``min_rows`` rows, then
    the other rows together (path None); empty when the batch would run as one anyway."""
    paths, inverse, counts = torch.unique(decisions, dim=0, return_inverse=True, return_counts=True)
    if paths.shape[0] == 1:
        return []
    big = [p for p in range(paths.shape[0]) if counts[p] >= min_rows]
    rest = torch.nonzero(~torch.isin(inverse, torch.tensor(big, dtype=inverse.dtype))).flatten()
    if not big or (len(big) == 1 and rest.numel() == 0):
        return []
    groups = [(torch.nonzero(inverse == p).flatten(), tuple(paths[p].tolist())) for p in big]
    return groups + ([(rest, None)] if rest.numel() else [])


def plain_step(kwargs: dict, config, length: int) -> bool:
    """Whether a forward is a decode step that a whole-step graph can run: one new token, no per-block outputs."""
    if length != 1 or kwargs.get("return_dict") is False:
        return False
    return not any(kwargs.get(k, getattr(config, k, False)) for k in ("output_hidden_states", "output_attentions"))


def graphs_for(state, observer, cache: RoutedCache, kwargs: dict, config, length: int):
    """The model's path graphs if this step of ``cache`` can run on them (else None); at a sequence's first decode
    step, its groups are decided."""
    if cache.groups is None and length == 1:  # an observer sees every row at each block: no groups then
        cache.groups = _split(cache, kwargs) if observer is None else []
    if observer is None and not state.devices and fixed_slots(cache) and plain_step(kwargs, config, length):
        return state.graphs
    return None


def model_step(top, base, state, cache: RoutedCache, kwargs: dict, name: str, length: int):
    """A decode step of a batch on one frozen path (no groups) as that path's whole-model graph, the head
    included (:func:`~.path_graphs.model_view`); None when this step is not one (it then runs as usual)."""
    if state.graphs is None or child_name(top, base) is None or kwargs.get("labels") is not None:
        return None
    graphs = graphs_for(state, None, cache, kwargs, top.config, length)
    path = _one_path(cache.decisions) if graphs is not None and not cache.groups else None
    if path is None:
        return None
    kwargs.pop("routing_mask", None)  # the routed forward's keyword; the graph has no routing left to do
    return _path_step(graphs, base, cache, path, kwargs, name, top)


def continue_step(base, original, state, call: Call, kwargs: dict, name: str, length: int):
    """Run a forward that continues ``call.cache`` (frozen decisions): grouped, as one path's graph, or as is."""
    cache = call.cache
    graphs = graphs_for(state, call.observer, cache, kwargs, base.config, length)
    if cache.groups:
        return _run_groups(base, original, state, call, kwargs, name, graphs)
    path = _one_path(cache.decisions)
    if graphs is not None and path is not None:
        return _path_step(graphs, base, cache, path, kwargs, name)
    with running(call):
        return original(**kwargs)


def _one_path(decisions: torch.Tensor) -> tuple | None:
    """The path every row follows, or None when rows differ."""
    if bool((decisions == decisions[:1]).all()):
        return tuple(decisions[0].tolist())
    return None


def _split(cache: RoutedCache, kwargs: dict) -> list[Group]:
    """The groups of a sequence at its first decode step, under this context's policy ([] for none)."""
    policy = _POLICY.get()
    if not policy.enabled or cache.decisions.shape[0] < 2:
        return []
    tokens = kwargs.get("input_ids")
    device = (tokens if tokens is not None else kwargs["inputs_embeds"]).device
    planned = plan_groups(cache.decisions, policy.threshold(device))
    return [Group(rows.to(device), cache.rows(rows), path) for rows, path in planned]


def _path_step(graphs, base, cache: RoutedCache, path: tuple, kwargs: dict, name: str, top=None):
    out = graphs.run(base, cache, path, kwargs, name, top)
    for key, value in list(out.items()):  # the output's cache is the routed cache, not the graph's view of it
        if isinstance(value, (RoutedCache, PathCache)):
            out[key] = cache
    return out


def _run_groups(base, original, state, call: Call, kwargs: dict, name: str, graphs):
    """Each group on its own rows and cache; per-row outputs scattered back into the batch's order."""
    cache = call.cache
    batch = cache.decisions.shape[0]
    merged = None
    for group in cache.groups:
        sub = group.cache
        sub.seen_tokens = cache.seen_tokens
        group_kwargs = {k: _rows(v, group.rows, batch) for k, v in kwargs.items()}
        group_kwargs[name] = sub
        if graphs is not None and group.path is not None:
            out = _path_step(graphs, base, sub, group.path, group_kwargs, name)
        else:
            group_call = Call(owner=state, decisions=sub.decisions, plan=sub.plan, observer=call.observer,
                              devices=state.devices)
            group_call.cache = sub
            with running(group_call):
                out = original(**group_kwargs)
        merged = out if merged is None else merged
        for key, value in list(out.items()):
            merged[key] = _scatter(None if merged is out else merged[key], value, group.rows, batch)
    for key, value in merged.items():
        if isinstance(value, RoutedCache):
            merged[key] = cache
    return merged


def _rows(value, index: torch.Tensor, batch: int):
    """The rows ``index`` of a per-row input (tensors and dicts or tuples of them with ``batch`` rows)."""
    if isinstance(value, torch.Tensor):
        return value.index_select(0, index.to(value.device)) if value.dim() and value.shape[0] == batch else value
    if isinstance(value, dict):
        return {k: _rows(v, index, batch) for k, v in value.items()}
    if isinstance(value, tuple):
        return tuple(_rows(v, index, batch) for v in value)
    return value


def _scatter(into, value, index: torch.Tensor, batch: int):
    """A group's per-row output ``value`` written at its rows of ``into`` (made full-size at the first group)."""
    if isinstance(value, torch.Tensor) and value.dim():
        into = value.new_zeros((batch, *value.shape[1:])) if into is None else into
        return into.index_copy_(0, index.to(value.device), value)
    if isinstance(value, tuple):
        return tuple(_scatter(a, v, index, batch) for a, v in zip(into or (None,) * len(value), value))
    return value if into is None else into
