"""Execution paths: one decision per block (0 skip, 1 execute, 2 repeat)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

SKIP, EXECUTE, REPEAT = 0, 1, 2


def as_paths(paths, num_blocks: int, batch_size: int | None = None) -> torch.Tensor:
    """Validate ``paths`` and return them as an int64 CPU tensor ``[B, L]``.

    Accepts a ``[B, L]`` or ``[L]`` tensor or nested lists. With
    ``batch_size``, a single row is broadcast to every row and any count but
    1 or ``batch_size`` is refused (the runtime expands one path per prompt
    for ``generate``'s beams and ``num_return_sequences`` itself).
    """
    t = torch.as_tensor(paths)
    if t.is_floating_point() or t.dtype == torch.bool or t.is_complex():
        raise ValueError(f"paths must hold integers 0 (skip), 1 (execute) or 2 (repeat), got dtype {t.dtype}")
    t = t.detach().to("cpu", torch.int64)
    if t.dim() == 1:
        t = t[None]
    if t.dim() != 2 or t.shape[1] != num_blocks:
        raise ValueError(
            f"paths must have shape [batch, {num_blocks}] (one decision per block of this model), "
            f"got {tuple(torch.as_tensor(paths).shape)}"
        )
    if t.numel() and (t.min() < 0 or t.max() > 2):
        raise ValueError("path values must be 0 (skip), 1 (execute) or 2 (repeat); found "
                         f"values {sorted(set(t.flatten().tolist()) - {0, 1, 2})}")
    if batch_size is not None and t.shape[0] != batch_size:
        if t.shape[0] != 1:
            raise ValueError(
                f"got {t.shape[0]} paths for a batch of {batch_size} rows: give one path per row, "
                "or a single path for all rows"
            )
        t = t.expand(batch_size, -1).clone()
    return t


def default_path(num_blocks: int) -> torch.Tensor:
    """The vanilla path: every block executed once."""
    return torch.ones(num_blocks, dtype=torch.int64)


def path_length(paths: torch.Tensor | Sequence) -> torch.Tensor:
    """Block applications per forward pass (sum of decisions), per row."""
    return torch.as_tensor(paths).sum(dim=-1)


def path_to_str(path) -> str:
    """Compact text form, e.g. ``'1101211'``."""
    return "".join(str(int(d)) for d in torch.as_tensor(path).flatten())


def skip_set_path(num_blocks: int, skips: Sequence[int]) -> str:
    """The path string that skips ``skips`` and executes every other block once."""
    skipped = set(skips)
    return "".join("0" if i in skipped else "1" for i in range(num_blocks))


def path_from_str(text: str) -> torch.Tensor:
    """Inverse of :func:`path_to_str`."""
    if not text or any(c not in "012" for c in text):
        raise ValueError(f"invalid path string {text!r}: use one digit 0/1/2 per block")
    return torch.tensor([int(c) for c in text], dtype=torch.int64)
