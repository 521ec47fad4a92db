"""Fused windowed mean pooling + router MLP (one block, whole batch).

For each row b of ``hidden[B, T, H]`` the real tokens (``mask != 0``: left or
right padding, or any gaps, taken in order by their rank) are split into ``W = min(nw, T_real)``
windows with ``torch.tensor_split`` semantics; each window's mean goes through
``Linear(H, D) -> GELU(tanh) -> Linear(D, K)`` (D = 128, K = 3) and the W
logit vectors are averaged. See :func:`drllm.ops.pooled_router_logits_reference`.

Two launches, one pass over the hidden states:

1. ``_pool_linear1`` on a grid ``(B, cdiv(H, BLOCK_H))``. Each program counts its
   row's real tokens from the mask, then streams that row's tiles for one
   slice of H, ranking the real tokens of each tile with a prefix sum: a one-hot window matrix ``[NW, BLOCK_T]`` times the token tile
   ``[BLOCK_T, BLOCK_H]`` (``tl.dot``, fp32 accumulation; 0/1 weights are exact
   in bf16/fp16) adds the tile into the window sums. The slice of the window
   means then meets the matching slice of W1: ``[NW, BLOCK_H] @ [BLOCK_H, D]``
   is this program's share of the first linear layer, stored in a small fp32
   scratch ``[B, S, nw, D]``. Padding tokens are never read, and every hidden
   element is read once.
2. ``_router_head`` on a grid ``(B,)`` sums the S shares (fixed order, so the
   result is deterministic), adds b1, applies GELU(tanh), the second linear
   layer, and averages the logits over the row's W valid windows.

Splitting H (not the windows) over programs keeps the GPU busy for batch 1 and
long prompts, and W1 is read once per row.
"""

import os

import torch

from . import HAS_TRITON as _HAVE_TRITON


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``).

    Triton decorates its own library functions when it is imported, so the
    variable must be set before the first kernel call (the first import of triton).
    """
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "yes", "on")


def _triton_module():
    """The kernels, imported (with triton) on first use."""
    from . import _triton_pooled_router

    return _triton_pooled_router


def _launcher(kernel, interpret: bool):
    """Compiled kernels launch through ``torch.library.wrap_triton``, so torch.compile traces them inside the op."""
    return kernel if interpret else torch.library.wrap_triton(kernel)


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


_HIDDEN_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def supports(hidden: torch.Tensor, mask: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> bool:
    """Whether :func:`pooled_router_logits_triton` can run on these inputs here."""
    if not _HAVE_TRITON:
        return False
    if not interpreting() and hidden.device.type != "cuda":
        return False  # compiled Triton runs on CUDA tensors only
    return (
        hidden.dim() == 3
        and hidden.dtype in _HIDDEN_DTYPES
        and mask.dim() == 2
        and mask.shape == hidden.shape[:2]
        and mask.device == hidden.device
        and w1.dim() == 2
        and w2.dim() == 2
        and w1.shape[1] == hidden.shape[2]
        and w2.shape[1] == w1.shape[0]
        and w1.dtype == torch.float32
    )


def pooled_router_logits_triton(
    hidden: torch.Tensor,
    mask: torch.Tensor,
    num_windows: int,
    w1: torch.Tensor,
    b1: torch.Tensor,
    w2: torch.Tensor,
    b2: torch.Tensor,
    *,
    block_t: int | None = None,
    block_h: int | None = None,
    num_warps: int = 4,
) -> torch.Tensor:
    """Router logits ``[B, K]`` (float32); same contract as the reference.

    Compiled for CUDA tensors; in the interpreter (``TRITON_INTERPRET=1``) on
    any device. No
    autograd: use the reference when gradients are needed. Rows with no real
    token give NaN (the dispatcher in :mod:`drllm.ops` checks for them).
    """
    if not _HAVE_TRITON:
        raise RuntimeError("triton is not installed")
    interpret = interpreting()
    if not interpret and hidden.device.type != "cuda":
        raise RuntimeError("compiled Triton kernels need CUDA tensors (or set TRITON_INTERPRET=1 before importing triton)")
    if num_windows < 1:
        raise ValueError(f"num_windows must be >= 1, got {num_windows}")
    B, T, H = hidden.shape
    D = w1.shape[0]
    K = w2.shape[0]
    if mask.dtype == torch.bool:  # bool pointers are awkward in Triton; 1 byte either way
        mask = mask.view(torch.uint8)
    w1 = w1.float()
    b1 = b1.float().contiguous()
    w2 = w2.float().contiguous()
    b2 = b2.float().contiguous()
    out = torch.empty((B, K), device=hidden.device, dtype=torch.float32)
    if B == 0:
        return out
    if block_h is None:  # the interpreter's cost is per program and per op: few, large tiles
        block_h = 1024 if interpret else 64
    if block_t is None:
        block_t = 64 if interpret else 32
    block_h = max(16, min(_next_pow2(block_h), _next_pow2(H)))
    block_t = max(16, _next_pow2(block_t))
    S = -(-H // block_h)
    NWP = max(16, _next_pow2(num_windows))
    BLOCK_D = max(16, _next_pow2(D))
    part = torch.empty((B, S, num_windows, D), device=hidden.device, dtype=torch.float32)
    # triton 3.8's interpreter multiplies the raw bits of bf16 operands in tl.dot: upcast there.
    dot_f32 = hidden.dtype == torch.float32 or (interpret and hidden.dtype == torch.bfloat16)
    k1, k2 = (_launcher(k, interpret) for k in _triton_module()._kernels(interpret))
    k1[(B, S)](
        hidden, mask, w1, part,
        T, H, D, num_windows, S,
        hidden.stride(0), hidden.stride(1), hidden.stride(2), mask.stride(0), mask.stride(1),
        w1.stride(0), w1.stride(1),
        NWP=NWP, BLOCK_T=block_t, BLOCK_H=block_h, BLOCK_D=BLOCK_D,
        DOT_F32=dot_f32, num_warps=num_warps,
    )  # fmt: skip
    k2[(B,)](
        mask, part, b1, w2, b2, out,
        T, D, num_windows, S, K,
        mask.stride(0), mask.stride(1),
        NWP=NWP, BLOCK_T=block_t, BLOCK_D=BLOCK_D, BLOCK_K=max(4, _next_pow2(K)),
        num_warps=num_warps,
    )  # fmt: skip
    return out
