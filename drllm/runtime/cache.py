"""Routed KV cache: one slot per (block, pass), each holding only its rows.

Slot ``i`` holds the first pass of block ``i``, slot ``L + i`` the second
pass of a repeated block (:meth:`RoutedCache.slot` is the one place that
says so). Decisions are frozen at the prefill, so the rows that run a given
(block, pass) never change during decoding; each slot stores the K/V of
exactly those rows, in ascending row order (or every row, for a pass that
runs all rows and selects), and a skipped block stores nothing. Slot layers
are transformers' own layer classes (dynamic, static, sliding window),
copied from the cache ``generate`` or the caller created, so their update
and mask logic is reused as is.

Beam search and the other row operations of transformers' ``Cache``
(:meth:`RoutedCache.reorder_cache`, ``batch_select_indices``,
``batch_repeat_interleave``) move the frozen decisions with the rows and
map each slot's rows accordingly. A caller's own empty cache object given
to a routed forward gets the routed cache attached (:func:`attach`), so
passing that object back continues the same sequence.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from .plan import Rows, replan

ATTACHED = "_drllm_routed_cache"  # attribute of a caller's cache object: the routed cache it stands for


def slot_of(block: int, second_pass: bool, num_blocks: int) -> int:
    """The slot of one (block, pass) in a routed cache of ``num_blocks`` blocks: the one place that says so."""
    return block + num_blocks if second_pass else block


class RoutedCache(Cache):
    """A transformers ``Cache`` whose layers are (block, pass) slots."""

    def __init__(self, slot_layers: list, num_blocks: int):
        super().__init__(layers=slot_layers)
        self.num_blocks = num_blocks
        self.decisions: torch.Tensor | None = None  # [B, L] frozen at the prefill
        self.plan = None  # the executor's per-block row plan, frozen with the decisions
        self.seen_tokens = 0
        # Decided at the first decode step (:mod:`.grouping`): [] runs the batch as one, a list of
        # :class:`Group` runs each group of rows on a routed cache of its own (which then holds the K/V).
        self.groups: list | None = None
        # One view per slot, made once: the executor hands them to the blocks on every step.
        self.views = [SlotView(self, i) for i in range(len(slot_layers))]

    @classmethod
    def like(cls, template: Cache | None, config, num_blocks: int) -> "RoutedCache":
        """An empty routed cache whose slots copy the layer types of ``template``.

        ``template`` is an empty cache (e.g. the one ``generate`` made); without
        one, a dynamic cache for ``config`` is used.
        """
        layers = list(template.layers) if template is not None else []
        if len(layers) != num_blocks:
            layers = DynamicCache(config=config).layers
        if len(layers) != num_blocks:
            raise ValueError(f"cannot build a routed cache: expected {num_blocks} cache layers, got {len(layers)}")
        slots = [copy.deepcopy(layer) for layer in layers] + [copy.deepcopy(layer) for layer in layers]
        return cls(slots, num_blocks)

    def slot(self, block: int, second_pass: bool) -> int:
        """The slot of one (block, pass)."""
        return slot_of(block, second_pass, self.num_blocks)

    def view(self, block: int, second_pass: bool) -> "SlotView":
        """What the block sees as its cache on that pass."""
        return self.views[self.slot(block, second_pass)]

    def slot_plans(self):
        """``(slot, PassPlan)`` of every (block, pass) of the frozen plan."""
        for block, passes in enumerate(self.plan or ()):
            for second, plan in enumerate(passes):
                yield self.slot(block, bool(second)), plan

    def holders(self) -> list["RoutedCache"]:
        """The routed caches holding this sequence's K/V: its groups' once grouped, else itself."""
        return [group.cache for group in self.groups] if self.groups else [self]

    def filled(self) -> list:
        """The slot layers that hold K/V of this sequence (a pass no row runs holds none)."""
        if self.groups:
            return [layer for cache in self.holders() for layer in cache.filled()]
        if self.plan is None:
            return [layer for layer in self.layers if layer.is_initialized]
        return [self.layers[s] for s, plan in self.slot_plans() if plan.mode != Rows.NONE
                and self.layers[s].is_initialized]

    def rows(self, index: torch.Tensor) -> "RoutedCache":
        """A routed cache of the rows ``index`` of this one, with their decisions and a copy of their K/V; this
        cache is unchanged."""
        # Deep-copied with every slot's K/V shared (the memo maps them to themselves) until remap_rows selects.
        shared = {id(t): t for layer in self.layers for t in (getattr(layer, "keys", None),
                                                              getattr(layer, "values", None)) if t is not None}
        new = copy.deepcopy(self, shared)
        new.remap_rows(index)
        return new

    # -- what transformers asks of a cache ---------------------------------
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def get_mask_sizes(self, query_length: int, layer_idx: int) -> tuple[int, int]:
        # Every used slot has seen the same tokens: answer from one that holds
        # data, of the same kind (sliding or not) as the slot asked about.
        asked = self.layers[layer_idx]
        for layer in self.filled():
            if getattr(layer, "is_sliding", False) == getattr(asked, "is_sliding", False):
                return layer.get_mask_sizes(query_length)
        return asked.get_mask_sizes(query_length)

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last ``-tokens_to_remove`` tokens (transformers >= 5.24); a positive value is the length to
        keep (earlier versions). Slots no row fills are left alone."""
        remove = tokens_to_remove if tokens_to_remove <= 0 else min(tokens_to_remove - self.seen_tokens, 0)
        for layer in self.filled():
            layer.crop(remove)
        for cache in {id(c): c for c in [self, *self.holders()]}.values():
            cache.seen_tokens += remove

    def reorder_cache(self, beam_idx: torch.LongTensor):
        """Beam search: new row ``r`` continues old row ``beam_idx[r]``, with that row's frozen path."""
        self.remap_rows(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor):
        """Keep the rows ``indices`` (with their frozen paths)."""
        indices = torch.as_tensor(indices)
        if indices.dtype == torch.bool:
            indices = torch.nonzero(indices).flatten()
        self.remap_rows(indices)

    def batch_repeat_interleave(self, repeats: int):
        """Repeat each row ``repeats`` times in place (with its frozen path)."""
        if self.decisions is not None:
            self.remap_rows(torch.arange(self.decisions.shape[0]).repeat_interleave(repeats))

    def remap_rows(self, rows: torch.Tensor) -> None:
        """New row ``r`` is old row ``rows[r]``: decisions, plans and every slot's K/V follow the rows.

        A slot holds its pass's rows in ascending order (or every row): each
        new slot row takes the old slot position of its source row.
        """
        if self.decisions is None:  # nothing routed or stored yet
            return
        rows = torch.as_tensor(rows).flatten().to("cpu", torch.int64)
        old_batch = self.decisions.shape[0]
        if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= old_batch):
            raise IndexError(f"row indices {rows.tolist()} out of range for a cache of {old_batch} rows")
        decisions = self.decisions.index_select(0, rows)
        plan = replan(decisions, self.plan)
        if self.groups:  # each group's cache maps its own rows (rows of one group come from rows of that group)
            self._remap_groups(rows, old_batch)
            self.decisions, self.plan = decisions, plan
            return
        everyone_old, everyone_new = torch.arange(old_batch), torch.arange(rows.numel())
        for (slot, old), (_, new) in zip(list(self.slot_plans()), _slot_plans(self, plan)):
            layer = self.layers[slot]
            if old.mode == Rows.NONE or not layer.is_initialized:
                continue
            if new.mode == Rows.NONE:  # no row runs this pass any more
                if isinstance(layer, DynamicLayer):
                    layer.reset()
                continue
            held = everyone_old if old.mode in (Rows.ALL, Rows.SELECT) else old.index.cpu()
            position = torch.full((old_batch,), -1, dtype=torch.int64)
            position[held] = torch.arange(held.numel())
            wanted = everyone_new if new.mode in (Rows.ALL, Rows.SELECT) else new.index.cpu()
            mapping = position[rows[wanted]]
            if bool((mapping < 0).any()):
                raise AssertionError(f"slot {slot}: a row moved into a pass its source row did not run")
            _select_rows(layer, mapping)
        self.decisions, self.plan = decisions, plan

    def _remap_groups(self, rows: torch.Tensor, old_batch: int) -> None:
        owner, local = torch.empty(old_batch, dtype=torch.int64), torch.empty(old_batch, dtype=torch.int64)
        for g, group in enumerate(self.groups):
            held = group.rows.cpu()
            owner[held], local[held] = g, torch.arange(held.numel())
        kept = []
        for g, group in enumerate(self.groups):
            new_rows = torch.nonzero(owner[rows] == g).flatten()
            if new_rows.numel():
                group.cache.remap_rows(local[rows[new_rows]])
                kept.append(Group(new_rows.to(group.rows.device), group.cache, group.path))
        self.groups = kept

    def reset(self):
        super().reset()
        self.decisions, self.plan, self.seen_tokens, self.groups = None, None, 0, None


@dataclass
class Group:
    """Rows of a batch decoded together on a routed cache of their own (:mod:`.grouping`)."""

    rows: torch.Tensor  # [n] int64, on the model's device: the group's rows of the batch, ascending
    cache: RoutedCache  # those rows' K/V, decisions and plans
    path: tuple | None  # the path every row of the group follows; None for rows of several paths


def _slot_plans(cache: RoutedCache, plan: list):
    for block, passes in enumerate(plan):
        for second, pass_plan in enumerate(passes):
            yield cache.slot(block, bool(second)), pass_plan


def _select_rows(layer, mapping: torch.Tensor) -> None:
    """The layer's K/V rows ``mapping`` (its own reorder, which also fits caches of a fixed size)."""
    layer.reorder_cache(mapping)
    if hasattr(layer, "max_batch_size"):
        layer.max_batch_size = mapping.numel()
    if getattr(layer, "is_compileable", False) and isinstance(getattr(layer, "keys", None), torch.Tensor):
        # new tensors: keep them at fixed addresses for compiled steps (CUDA graphs), as their first allocation was
        torch._dynamo.mark_static_address(layer.keys)
        torch._dynamo.mark_static_address(layer.values)


def routed_cache(cache) -> RoutedCache | None:
    """``cache`` if it is a routed cache, the routed cache attached to a caller's cache object, or None."""
    if isinstance(cache, RoutedCache):
        return cache
    return getattr(cache, ATTACHED, None)


def attach(cache, routed: RoutedCache) -> None:
    """Keep ``routed`` with the caller's own ``cache`` object: given back, that object continues the sequence."""
    setattr(cache, ATTACHED, routed)


class SlotView:
    """What one (block, pass) sees as its KV cache: writes go to its slot's layer.

    It holds the layer object itself, not an index into the cache, so that a
    compiled block sees the same kind of object for every slot and compiles
    one graph for all of them.
    """

    def __init__(self, cache: RoutedCache, slot: int):
        self.cache = cache
        self.layer = cache.layers[slot]

    def update(self, key_states, value_states, layer_idx=None, *args, **kwargs):
        return self.layer.update(key_states, value_states, *args, **kwargs)

    def __deepcopy__(self, memo):
        view = object.__new__(SlotView)
        memo[id(self)] = view
        view.cache = copy.deepcopy(self.cache, memo)
        view.layer = copy.deepcopy(self.layer, memo)
        return view

    def __getattr__(self, name):
        # Only reached for names the view lacks; its own fields are never forwarded (a half-built copy has none).
        if name in ("cache", "layer") or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.cache, name)
