"""Hot-path ops of the routed runtime: references, ``torch.library`` registrations, dispatch.

One op, one place: :mod:`.reference` holds the plain PyTorch kernels (the
specification), :mod:`.pooling` and :mod:`.rows` each op's registration, fake
kernel and dispatcher, :mod:`.backends` the choice of backend. The fast paths
live outside this package: ``kernels/`` (Triton, installed as ``drllm.kernels``)
and ``csrc/`` (C++/CUDA, built as ``drllm._C``).

Dispatch. :func:`pooled_router_logits`, :func:`compact_rows`,
:func:`gather_rows` and :func:`scatter_rows` take a fast path when one applies
and the reference otherwise:

- pooling + router MLP: the operator ``torch.ops.drllm.pooled_router_logits``
  (so the dispatcher and torch.compile see one op): the fused Triton kernel for
  CUDA tensors, the reference on the CPU (faster there than Triton's
  interpreter);
- row compaction, gather, scatter: the extension's ``torch.ops.drllm.*``, on
  the CPU and, when built with CUDA, on the GPU.

The reference is used whenever a fast path does not apply: gradients are
required (the fast paths have no backward), the device or dtype is not
supported, or the fast path is not installed. A missing or broken
``drllm.kernels`` or ``drllm._C`` gives one warning at import (none for the
extension when ``DRLLM_NO_EXT=1`` is also set at run time: then it is not loaded).

``DRLLM_OPS_BACKEND`` (read at import; :func:`set_backend` changes it for the
calling thread only) selects: ``auto`` (default), ``reference`` (PyTorch
everywhere), ``triton`` (Triton for the pooling wherever it can run, including
CPU tensors when ``TRITON_INTERPRET=1``; the reference for row ops) or ``ext``
(the extension for row ops; the reference for the pooling). :func:`backend`
reports the choice, :func:`has_kernel` what the extension provides.
"""

from .backends import BACKENDS, backend, has_kernel, pooling_choice, set_backend
from .pooling import pooled_router_logits
from .reference import (
    compact_rows_reference,
    gather_rows_reference,
    pooled_router_logits_loop,
    pooled_router_logits_reference,
    require_real_tokens,
    router_mlp,
    scatter_rows_reference,
    weighted_router_logits,
    window_means,
    window_weights,
)
from .rows import compact_rows, gather_rows, scatter_rows

__all__ = [
    "BACKENDS",
    "backend",
    "has_kernel",
    "pooling_choice",
    "set_backend",
    "pooled_router_logits",
    "compact_rows",
    "gather_rows",
    "scatter_rows",
    "window_weights",
    "require_real_tokens",
    "window_means",
    "router_mlp",
    "weighted_router_logits",
    "pooled_router_logits_reference",
    "pooled_router_logits_loop",
    "compact_rows_reference",
    "gather_rows_reference",
    "scatter_rows_reference",
]
