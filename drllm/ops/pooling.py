"""The pooling + router op: its ``torch.library`` registration, its fake kernel and its dispatcher.

``torch.ops.drllm.pooled_router_logits`` is one operator for the dispatcher and
the compiler: ``triton_op`` lets torch.compile see the Triton kernels inside
(on CUDA) and trace the reference on the CPU; ``custom_op`` when triton is
absent.
"""

from __future__ import annotations

import torch

from .backends import compiling, grad_needed, kernels, pooling_choice
from .reference import pooled_router_logits_reference, require_real_tokens, weighted_router_logits, window_weights


def _fused_or_reference(hidden, mask, num_windows, w1, b1, w2, b2):
    """The fused Triton kernel where this thread's backend picks it for the device and it takes the inputs, else the reference."""
    if pooling_choice(hidden.device.type) == "triton" and kernels.supports(hidden, mask, w1, w2):
        return kernels.pooled_router_logits_triton(hidden, mask, num_windows, w1, b1, w2, b2)
    return weighted_router_logits(window_weights(mask, num_windows), hidden, w1, b1, w2, b2)  # checked by the caller


_define_op = torch.library.triton_op if kernels is not None and kernels.HAS_TRITON else torch.library.custom_op


@_define_op("drllm::pooled_router_logits", mutates_args=())
def _pooled_router_logits_op(hidden: torch.Tensor, mask: torch.Tensor, num_windows: int, w1: torch.Tensor,
                             b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor) -> torch.Tensor:
    """The op's kernel on every device; its schema comes from these annotations."""
    return _fused_or_reference(hidden, mask, num_windows, w1, b1, w2, b2)


@_pooled_router_logits_op.register_fake
def _pooled_router_logits_fake(hidden, mask, num_windows, w1, b1, w2, b2):
    return hidden.new_empty((hidden.shape[0], w2.shape[0]), dtype=torch.float32)


def pooled_router_logits(
    hidden: torch.Tensor,
    mask: torch.Tensor,
    num_windows: int,
    w1: torch.Tensor,
    b1: torch.Tensor,
    w2: torch.Tensor,
    b2: torch.Tensor,
    *,
    validate: bool = True,
) -> torch.Tensor:
    """Router logits ``[B, 3]`` (float32) for one block and the whole batch.

    ``hidden`` is ``[B, T, H]`` (fp32/bf16/fp16), ``mask`` ``[B, T]`` marks the
    tokens to pool over (any subset of the row: padding on either side, or
    gaps, as with a ``routing_mask``). The logits of the windows' means are
    averaged over the row's windows. Runs ``torch.ops.drllm.pooled_router_logits``
    (the fused kernel on CUDA, the reference on the CPU), or the reference
    itself when gradients are needed.

    ``validate``: raise ``ValueError`` on a row without real tokens, as the
    reference does. On CUDA this check synchronises; with ``validate=False``
    such a row gets NaN logits instead (on the fused path).
    """
    if num_windows < 1:
        raise ValueError(f"num_windows must be >= 1, got {num_windows}")
    if grad_needed(hidden, w1, b1, w2, b2):
        return pooled_router_logits_reference(hidden, mask, num_windows, w1, b1, w2, b2)
    if validate and not compiling() and hidden.shape[0] > 0:
        require_real_tokens(mask)
    return torch.ops.drllm.pooled_router_logits(hidden, mask, num_windows, w1, b1, w2, b2)
