"""Padding token lists into batches, the one way every scorer and extractor does it."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def pad_batch(token_lists: Sequence[Sequence[int]], pad_id: int, *, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids ``[B, W]`` and attention mask ``[B, W]``, padded on the right (or the left, for generation)."""
    width = max(len(t) for t in token_lists)
    ids = torch.full((len(token_lists), width), int(pad_id), dtype=torch.long)
    mask = torch.zeros((len(token_lists), width), dtype=torch.long)
    for row, tokens in enumerate(token_lists):
        span = slice(width - len(tokens), width) if left else slice(0, len(tokens))
        ids[row, span] = torch.tensor(list(tokens), dtype=torch.long)
        mask[row, span] = 1
    return ids, mask


def prefix_mask(lengths: Sequence[int], width: int) -> torch.Tensor:
    """``[B, width]`` mask of each right-padded row's first ``lengths[b]`` tokens (e.g. the routing context)."""
    return (torch.arange(width)[None] < torch.tensor(list(lengths))[:, None]).long()
