"""Routed KV cache: one slot per (block, pass), each holding only its rows.

Slot ``i`` holds the first pass of block ``i``, slot ``L + i`` the second
pass of a repeated block (:meth:`RoutedCache.slot` is the one place that
says so). Decisions are frozen at the prefill, so the rows that run a given
(block, pass) never change during decoding; each slot stores the K/V of
exactly those rows, in ascending row order, and a skipped block stores
nothing. Slot layers are transformers' own layer classes (dynamic, static,
sliding window), copied from the cache ``generate`` or the caller created,
so their update and mask logic is reused as is.
"""

from __future__ import annotations

import copy

import torch
from transformers.cache_utils import Cache, DynamicCache


class RoutedCache(Cache):
    """A transformers ``Cache`` whose layers are (block, pass) slots."""

    def __init__(self, slot_layers: list, num_blocks: int):
        super().__init__(layers=slot_layers)
        self.num_blocks = num_blocks
        self.decisions: torch.Tensor | None = None  # [B, L] frozen at the prefill
        self.plan = None  # the executor's per-block row plan, frozen with the decisions
        self.seen_tokens = 0
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
        return block + self.num_blocks if second_pass else block

    def view(self, block: int, second_pass: bool) -> "SlotView":
        """What the block sees as its cache on that pass."""
        return self.views[self.slot(block, second_pass)]

    # -- what transformers asks of a cache ---------------------------------
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def get_mask_sizes(self, query_length: int, layer_idx: int) -> tuple[int, int]:
        # Every used slot has seen the same tokens: answer from one that holds
        # data, of the same kind (sliding or not) as the slot asked about.
        asked = self.layers[layer_idx]
        for layer in self.layers:
            if layer.is_initialized and getattr(layer, "is_sliding", False) == getattr(asked, "is_sliding", False):
                return layer.get_mask_sizes(query_length)
        return asked.get_mask_sizes(query_length)

    @property
    def is_compileable(self) -> bool:
        return False

    def reorder_cache(self, beam_idx: torch.LongTensor):
        raise NotImplementedError(
            "beam search is not supported by the routed cache: use greedy decoding or sampling "
            "(num_return_sequences works)"
        )

    def batch_select_indices(self, indices: torch.Tensor):
        raise NotImplementedError("the routed cache keeps its rows fixed after the prefill")

    def batch_repeat_interleave(self, repeats: int):
        if self.seen_tokens:
            raise NotImplementedError("the routed cache keeps its rows fixed after the prefill")

    def crop(self, tokens_to_remove: int) -> None:
        super().crop(tokens_to_remove)
        self.seen_tokens += min(tokens_to_remove, 0)

    def reset(self):
        super().reset()
        self.decisions, self.plan, self.seen_tokens = None, None, 0


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

    def __getattr__(self, name):
        return getattr(self.cache, name)
