"""Router logits of every block for one prompt batch, the pooling weights computed once per call."""

from __future__ import annotations

import torch

from .. import ops
from .routers import Routers


class Pooling:
    """Router logits of every block for one prompt batch, the pooling weights computed once.

    The windowed-mean weights depend only on the prompt's mask, so the
    reference computation (:func:`drllm.ops.pooled_router_logits_reference`)
    is split: the ``[B, W, T]`` weights once per forward call (and device),
    then per block :func:`drllm.ops.weighted_router_logits` -- the reference's
    own code, hence the same logits. Where the ops dispatch to a fused kernel
    (Triton on CUDA), or for routers other than :class:`Routers`, each block
    calls ``routers.logits``. Each block's router may live on its own device
    (accelerate-dispatched models): its inputs are moved there.
    """

    def __init__(self, routers, mask: torch.Tensor):
        self.routers, self.mask = routers, mask
        self.hoist = type(routers).logits is Routers.logits
        self.weights = {}  # device -> pooling weights

    def logits(self, block: int, hidden: torch.Tensor) -> torch.Tensor:
        device = self.routers.device_of(block) if self.hoist else hidden.device
        hidden = hidden.to(device)
        if not self.hoist or ops.pooling_choice(device.type) != "reference":
            return self.routers.logits(block, hidden, self.mask.to(device))
        if device not in self.weights:
            self.weights[device] = ops.window_weights(self.mask.to(device), self.routers.num_windows)
        return self.routers.weighted_logits(block, self.weights[device], hidden)
