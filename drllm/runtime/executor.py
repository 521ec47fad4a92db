"""Per-block execution of a batch whose rows follow different paths.

At block ``i`` the rows with decision >= 1 run pass one and the rows with
decision 2 run pass two. A pass that every row takes runs on the full batch
with no copies; a pass that some rows take gathers them into a contiguous
buffer, runs the block and scatters the result back. Row index tensors are
computed once per sequence (at the prefill) and reused on every decode
step, so decoding needs no host synchronisation per block.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from .. import ops
from .cache import RoutedCache, SlotView

NONE, ALL, SOME = 0, 1, 2
# Keyword arguments of a decoder layer that carry one entry per batch row.
ROW_KWARGS = ("attention_mask", "position_ids", "position_embeddings")


@dataclass(frozen=True)
class PassPlan:
    """Which rows run one pass of a block: none, all, or ``index``."""

    mode: int
    index: torch.Tensor | None = None


def plan_block(decisions: torch.Tensor, device: torch.device) -> tuple[PassPlan, PassPlan]:
    """The (pass one, pass two) plans of one block from its ``[B]`` decisions (CPU)."""
    batch = decisions.numel()
    counts = (int((decisions >= 1).sum()), int((decisions == 2).sum()))
    index = (None, None)
    if any(0 < n < batch for n in counts):
        index = ops.compact_rows(decisions.to(device))
    return tuple(
        PassPlan(NONE) if n == 0 else PassPlan(ALL) if n == batch else PassPlan(SOME, idx)
        for n, idx in zip(counts, index)
    )


def choose(logits: torch.Tensor, lam: float) -> torch.Tensor:
    """Decisions from router logits, shifted by the control knob ``lam`` in [-1, 1].

    ``lam < 0`` mixes the router's probabilities with a one-hot on skip,
    ``lam > 0`` with a one-hot on repeat (Dr.LLM, Appendix C).
    """
    if lam == 0:
        return logits.argmax(dim=-1)
    probs = logits.softmax(dim=-1)
    target = torch.zeros_like(probs)
    target[:, 0 if lam < 0 else 2] = 1.0
    return ((1 - abs(lam)) * probs + abs(lam) * target).argmax(dim=-1)


@dataclass
class Call:
    """State of one forward call of the patched model."""

    decisions: torch.Tensor  # [B, L] int64, CPU; filled block by block when routing
    plan: list  # per block: (PassPlan, PassPlan), or None until routed
    cache: RoutedCache | None = None
    routers: object = None
    lam: float = 0.0
    pool_mask: torch.Tensor | None = None
    observer: Callable | None = None
    inject: dict = field(default_factory=dict)  # block -> (row index, states entering that block)
    batch: int = field(init=False)

    def __post_init__(self):
        self.batch = self.decisions.shape[0]

    def enter(self, block: int, hidden: torch.Tensor) -> tuple[torch.Tensor, tuple[PassPlan, PassPlan]]:
        """The hidden state entering ``block`` (after injected prefixes) and the block's plan."""
        if block in self.inject:
            index, states = self.inject[block]
            hidden = states.to(hidden.dtype) if index is None else ops.scatter_rows(hidden, index, states)
        if self.observer is not None:
            self.observer(block, hidden)
        if self.plan[block] is None:
            logits = self.routers.logits(block, hidden, self.pool_mask)
            decided = choose(logits, self.lam)
            self.decisions[:, block] = decided.cpu()
            self.plan[block] = plan_block(self.decisions[:, block], hidden.device)
        return hidden, self.plan[block]


def row_subset(kwargs: dict, index: torch.Tensor, batch: int) -> dict:
    """``kwargs`` with the per-row tensors restricted to the rows ``index``."""
    out = dict(kwargs)
    for name in ROW_KWARGS:
        value = kwargs.get(name)
        if isinstance(value, torch.Tensor):
            if value.shape[0] == batch:
                out[name] = value.index_select(0, index)
        elif isinstance(value, tuple):
            out[name] = tuple(v.index_select(0, index) if v.shape[0] == batch else v for v in value)
        elif value is not None:
            raise NotImplementedError(
                f"cannot restrict {name} of type {type(value).__name__} to a row subset; "
                "load the model with attn_implementation='sdpa' or 'eager'"
            )
    return out


def routed_block(layer_forward: Callable, block: int, state) -> Callable:
    """Wrap a decoder layer's ``forward`` so it follows each row's decisions."""

    def forward(hidden_states, *args, **kwargs):
        call = state.call
        if call is None:  # called outside a patched model forward
            return layer_forward(hidden_states, *args, **kwargs)
        hidden_states, plan = call.enter(block, hidden_states)
        for second, p in enumerate(plan):
            if p.mode == NONE:
                continue
            kw = kwargs
            if call.cache is not None:
                kw = {**kwargs, "past_key_values": SlotView(call.cache, call.cache.slot(block, bool(second)))}
            if p.mode == ALL:
                hidden_states = layer_forward(hidden_states, *args, **kw)
            else:
                rows = ops.gather_rows(hidden_states, p.index)
                out = layer_forward(rows, *args, **row_subset(kw, p.index, call.batch))
                hidden_states = ops.scatter_rows(hidden_states, p.index, out)
        return hidden_states

    return forward
