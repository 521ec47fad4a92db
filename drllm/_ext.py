"""Loader of the compiled extension ``drllm._C`` (csrc/).

Importing ``drllm._C`` registers the operators ``torch.ops.drllm.*`` with the
dispatcher (CPU kernels, and CUDA ones when built with CUDA). This module adds
their fake (meta) implementations, so they trace under torch.compile, and
records why the extension is unavailable when it is (never built, built with
``DRLLM_NO_EXT=1``, or built against another torch). It never raises.
"""

from __future__ import annotations

import torch

OPS = ("compact_rows", "gather_rows", "scatter_rows", "scatter_rows_")

LOADED = False
ERROR: str | None = None

try:
    from drllm import _C  # noqa: F401  (registers torch.ops.drllm.*)

    for _name in OPS:
        getattr(torch.ops.drllm, _name)  # raises if the schema is missing (stale build)
    LOADED = True
except Exception as exc:  # ImportError, OSError (ABI mismatch: undefined symbol), AttributeError
    ERROR = f"{type(exc).__name__}: {exc}"


def has_kernel(op: str, device_type: str) -> bool:
    """Whether ``torch.ops.drllm.<op>`` has a kernel for this device type ("cpu", "cuda")."""
    if not LOADED:
        return False
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    if key is None:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"drllm::{op}", key)


if LOADED:

    @torch.library.register_fake("drllm::compact_rows")
    def _compact_rows_fake(decisions):
        torch._check(decisions.dim() == 1, lambda: "compact_rows: decisions must be 1-D")
        ctx = torch.library.get_ctx()
        # The output sizes depend on the data: unbacked symbolic sizes in [0, B].
        bound = decisions.shape[0] if isinstance(decisions.shape[0], int) else None
        n1 = ctx.new_dynamic_size(max=bound) if bound is not None else ctx.new_dynamic_size()
        n2 = ctx.new_dynamic_size(max=bound) if bound is not None else ctx.new_dynamic_size()
        return (
            decisions.new_empty((n1,), dtype=torch.long),
            decisions.new_empty((n2,), dtype=torch.long),
        )

    @torch.library.register_fake("drllm::gather_rows")
    def _gather_rows_fake(x, index):
        torch._check(index.dim() == 1, lambda: "gather_rows: index must be 1-D")
        return x.new_empty((index.shape[0], *x.shape[1:]))

    @torch.library.register_fake("drllm::scatter_rows")
    def _scatter_rows_fake(base, index, src):
        torch._check(index.dim() == 1, lambda: "scatter_rows: index must be 1-D")
        return base.new_empty(base.shape)

    @torch.library.register_fake("drllm::scatter_rows_")
    def _scatter_rows_inplace_fake(base, index, src):
        torch._check(index.dim() == 1, lambda: "scatter_rows_: index must be 1-D")
        return None
