"""The reference kernels: plain PyTorch, the specification every fast path is checked against.

They also serve where no fast path applies (gradients, an unsupported device or
dtype, a backend that is not installed), and :func:`window_weights` +
:func:`weighted_router_logits` let a caller that routes every block of one
prompt batch compute the pooling weights once.
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
    ``w >= W`` (all zero for a row without real tokens: no data-dependent
    branch, so it traces; callers check with :func:`require_real_tokens`).
    """
    real = mask.to(torch.bool)
    counts = real.sum(dim=1)  # [B]
    rank = real.long().cumsum(dim=1) - 1  # rank of each real token among the row's real tokens
    W = counts.clamp(min=1, max=num_windows)  # [B]
    q = (counts // W)[:, None]
    r = (counts % W)[:, None]
    big = r * (q + 1)  # tokens covered by the first r windows of size q+1
    window = torch.where(rank < big, rank // (q + 1), r + (rank - big) // q.clamp(min=1))
    size = torch.where(window < r, q + 1, q).to(torch.float32)
    weight = real.to(torch.float32) / size.clamp(min=1)
    onehot = F.one_hot(window.clamp(min=0, max=num_windows - 1), num_windows).to(torch.float32)
    return (onehot * weight[..., None]).transpose(1, 2)  # [B, nw, T]


def require_real_tokens(mask: torch.Tensor) -> None:
    """Raise on a row without real tokens (an empty prompt), which has no mean to pool."""
    if bool((mask == 0).all(dim=1).any()):
        raise ValueError("empty prompt: a row has no real tokens (attention mask all zero)")


def window_means(hidden: torch.Tensor, mask: torch.Tensor, num_windows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Window means ``[B, num_windows, H]`` (float32) and window validity ``[B, num_windows]``."""
    require_real_tokens(mask)
    weights = window_weights(mask, num_windows)
    means = torch.bmm(weights, hidden.to(torch.float32))
    valid = weights.sum(dim=2) > 0
    return means, valid


def router_mlp(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor) -> torch.Tensor:
    """Linear(H,128) -> GELU(tanh) -> Linear(128,3) in float32."""
    return F.linear(F.gelu(F.linear(x, w1, b1), approximate="tanh"), w2, b2)


def weighted_router_logits(weights, hidden, w1, b1, w2, b2):
    """Router logits ``[B, 3]`` from pooling weights of :func:`window_weights`, averaged over each row's windows.

    Split from the reference so that a caller routing every block of one
    prompt batch computes the weights once.
    """
    means = torch.bmm(weights, hidden.to(torch.float32))
    logits = router_mlp(means, w1, b1, w2, b2)  # [B, nw, 3]
    v = (weights.sum(dim=2) > 0).to(torch.float32)[..., None]
    return (logits * v).sum(dim=1) / v.sum(dim=1)


def pooled_router_logits_reference(hidden, mask, num_windows, w1, b1, w2, b2):
    """Reference for :func:`drllm.ops.pooled_router_logits`."""
    require_real_tokens(mask)
    return weighted_router_logits(window_weights(mask, num_windows), hidden, w1, b1, w2, b2)


def pooled_router_logits_loop(hidden, mask, num_windows, w1, b1, w2, b2, *, dtype=torch.float32):
    """Naive oracle of :func:`drllm.ops.pooled_router_logits`: a Python loop over rows and windows.

    Computes in ``dtype`` (pass ``torch.float64`` for a high-precision
    reference). Used by the tests and as the slow baseline of the benchmarks.
    """
    w1, b1, w2, b2 = (t.to(dtype) for t in (w1, b1, w2, b2))
    out = []
    for b in range(hidden.shape[0]):
        tokens = hidden[b][mask[b] != 0].to(dtype)  # [T_real, H]
        if tokens.shape[0] == 0:
            raise ValueError("empty prompt: a row has no real tokens (attention mask all zero)")
        windows = torch.tensor_split(tokens, min(num_windows, tokens.shape[0]))
        logits = [router_mlp(w.mean(dim=0), w1, b1, w2, b2) for w in windows]
        out.append(torch.stack(logits).mean(dim=0))
    return torch.stack(out)


def compact_rows_reference(decisions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference for :func:`drllm.ops.compact_rows`."""
    return (
        torch.nonzero(decisions >= 1).flatten(),
        torch.nonzero(decisions == 2).flatten(),
    )


def gather_rows_reference(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Reference for :func:`drllm.ops.gather_rows`."""
    return x.index_select(0, index)


def scatter_rows_reference(base: torch.Tensor, index: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """Reference for :func:`drllm.ops.scatter_rows`."""
    return base.index_copy(0, index, src)
