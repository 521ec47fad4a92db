"""Triton kernels of drllm (installed as ``drllm.kernels``).

Triton is optional and imported only when a kernel first runs (so that
``TRITON_INTERPRET=1`` may still be set after ``import drllm``). Without it
``HAS_TRITON`` is False and :mod:`drllm.ops` uses the PyTorch reference.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util


def _find_triton() -> tuple[bool, str | None]:
    try:
        if importlib.util.find_spec("triton") is None:
            return False, None
    except (ImportError, ValueError):  # e.g. sys.modules["triton"] is None
        return False, None
    try:
        return True, importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        return True, "unknown"


HAS_TRITON, TRITON_VERSION = _find_triton()

from .pooled_router import interpreting, pooled_router_logits_triton, supports  # noqa: E402

__all__ = ["HAS_TRITON", "TRITON_VERSION", "interpreting", "pooled_router_logits_triton", "supports"]
