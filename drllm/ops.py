"""Hot-path ops of the routed runtime.

Each function here is the specification: a plain PyTorch reference. Fast
versions (Triton kernels, the C++/CUDA extension) are dispatched from these
same functions and tested against the reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def window_weights(mask: torch.Tensor, num_windows: int) -> torch.Tensor:
    """Pooling weights ``[B, num_windows, T]`` of the windowed mean.

    The real tokens of each row (``mask != 0``) are split into
    ``W = min(num_windows, T_real)`` contiguous windows with
    ``torch.tensor_split`` semantics; row ``w`` of the result holds
    ``1/len(window w)`` on that window's tokens, and is all zero for
    ``w >= W``.
    """
    real = mask.to(torch.bool)
    counts = real.sum(dim=1)  # [B]
    if bool((counts == 0).any()):
        raise ValueError("empty prompt: a row has no real tokens (attention mask all zero)")
    rank = real.long().cumsum(dim=1) - 1  # rank of each real token among the row's real tokens
    W = counts.clamp(max=num_windows)  # [B]
    q = (counts // W)[:, None]
    r = (counts % W)[:, None]
    big = r * (q + 1)  # tokens covered by the first r windows of size q+1
    window = torch.where(rank < big, rank // (q + 1), r + (rank - big) // q.clamp(min=1))
    size = torch.where(window < r, q + 1, q).to(torch.float32)
    weight = real.to(torch.float32) / size.clamp(min=1)
    onehot = F.one_hot(window.clamp(min=0, max=num_windows - 1), num_windows).to(torch.float32)
    return (onehot * weight[..., None]).transpose(1, 2)  # [B, nw, T]


def window_means(hidden: torch.Tensor, mask: torch.Tensor, num_windows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Window means ``[B, num_windows, H]`` (float32) and window validity ``[B, num_windows]``."""
    weights = window_weights(mask, num_windows)
    means = torch.bmm(weights, hidden.to(torch.float32))
    valid = weights.sum(dim=2) > 0
    return means, valid


def router_mlp(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor) -> torch.Tensor:
    """Linear(H,128) -> GELU(tanh) -> Linear(128,3) in float32."""
    return F.linear(F.gelu(F.linear(x, w1, b1), approximate="tanh"), w2, b2)


def pooled_router_logits_reference(hidden, mask, num_windows, w1, b1, w2, b2):
    """Reference for :func:`pooled_router_logits`."""
    means, valid = window_means(hidden, mask, num_windows)
    logits = router_mlp(means, w1, b1, w2, b2)  # [B, nw, 3]
    v = valid.to(torch.float32)[..., None]
    return (logits * v).sum(dim=1) / v.sum(dim=1)


def pooled_router_logits(
    hidden: torch.Tensor,
    mask: torch.Tensor,
    num_windows: int,
    w1: torch.Tensor,
    b1: torch.Tensor,
    w2: torch.Tensor,
    b2: torch.Tensor,
) -> torch.Tensor:
    """Router logits ``[B, 3]`` (float32) for one block and the whole batch.

    ``hidden`` is ``[B, T, H]`` (fp32/bf16/fp16), ``mask`` ``[B, T]`` marks the
    tokens to pool over (the prompt's real tokens, contiguous per row).
    The logits of the windows' means are averaged over the row's windows.
    """
    return pooled_router_logits_reference(hidden, mask, num_windows, w1, b1, w2, b2)


def compact_rows(decisions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row indices (int64, ascending) that run pass one (decision >= 1) and pass two (== 2)."""
    return (
        torch.nonzero(decisions >= 1).flatten(),
        torch.nonzero(decisions == 2).flatten(),
    )


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows ``x[index]`` as a new contiguous tensor."""
    return x.index_select(0, index)


def scatter_rows(base: torch.Tensor, index: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """A copy of ``base`` whose rows ``index`` are replaced by ``src``."""
    return base.index_copy(0, index, src)
