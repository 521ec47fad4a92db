"""The row ops of the C++/CUDA extension (``csrc/``): their fake kernels and their dispatchers.

``drllm._C`` registers ``torch.ops.drllm.compact_rows``, ``gather_rows``,
``scatter_rows`` and ``scatter_rows_`` (CPU kernels, and CUDA ones when built
with CUDA). The fake kernels here let them trace under torch.compile; each is
registered when the extension loads (torch refuses a fake of an absent op),
at import or at a later :func:`drllm.ops.set_backend`. The dispatchers take the
extension where :func:`drllm.ops.backend` picks it and no gradient is needed,
else the reference.
"""

from __future__ import annotations

import torch

from .backends import grad_needed, rows_choice, when_ext_loaded
from .reference import compact_rows_reference, gather_rows_reference, scatter_rows_reference


def _fake(op: str):
    """Register the decorated function as the fake kernel of ``torch.ops.drllm.<op>`` once drllm._C defines it."""

    def register(fn):
        when_ext_loaded(lambda: torch.library.register_fake(f"drllm::{op}", fn))
        return fn

    return register


@_fake("compact_rows")
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


@_fake("gather_rows")
def _gather_rows_fake(x, index):
    torch._check(index.dim() == 1, lambda: "gather_rows: index must be 1-D")
    return x.new_empty((index.shape[0], *x.shape[1:]))


@_fake("scatter_rows")
def _scatter_rows_fake(base, index, src):
    torch._check(index.dim() == 1, lambda: "scatter_rows: index must be 1-D")
    return base.new_empty(base.shape)


@_fake("scatter_rows_")
def _scatter_rows_inplace_fake(base, index, src):
    torch._check(index.dim() == 1, lambda: "scatter_rows_: index must be 1-D")
    return None


def compact_rows(decisions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row indices (int64, ascending) that run pass one (decision >= 1) and pass two (== 2)."""
    if decisions.dim() == 1 and rows_choice("compact_rows", decisions.device.type) == "ext":
        return torch.ops.drllm.compact_rows(decisions)
    return compact_rows_reference(decisions)


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows ``x[index]`` as a new contiguous tensor."""
    if rows_choice("gather_rows", x.device.type) == "ext" and not grad_needed(x):
        return torch.ops.drllm.gather_rows(x, index)
    return gather_rows_reference(x, index)


def scatter_rows(base: torch.Tensor, index: torch.Tensor, src: torch.Tensor, *, inplace: bool = False) -> torch.Tensor:
    """A copy of ``base`` whose rows ``index`` are replaced by ``src``.

    With ``inplace=True`` the rows of ``base`` itself are replaced and ``base``
    is returned (no copy of the other rows). ``index`` must not repeat a row.
    """
    op = "scatter_rows_" if inplace else "scatter_rows"
    if rows_choice(op, base.device.type) == "ext" and not grad_needed(base, src):
        if inplace:
            torch.ops.drllm.scatter_rows_(base, index, src)
            return base
        return torch.ops.drllm.scatter_rows(base, index, src)
    if inplace:
        return base.index_copy_(0, index, src)
    return scatter_rows_reference(base, index, src)
