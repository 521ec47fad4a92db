"""Which backend each op call gets: the mode, what is installed, and loading it once.

The fast paths are two installed modules: ``drllm.kernels`` (Triton, from
``kernels/``, imported as a package: an install provides it) and ``drllm._C``
(the C++/CUDA extension from ``csrc/``). A missing or broken one gives one
warning and the ops use the reference. The mode (``DRLLM_OPS_BACKEND`` at
import, :func:`set_backend` after) is context-local: one thread's choice never
changes another's.
"""

from __future__ import annotations

import importlib
import os
import warnings
from collections.abc import Callable
from contextvars import ContextVar

import torch

BACKENDS = ("auto", "reference", "triton", "ext")
EXT_OPS = ("compact_rows", "gather_rows", "scatter_rows", "scatter_rows_")  # what drllm._C registers


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no", "off")


def _parse_backend(value: str | None) -> str:
    value = (value or "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        warnings.warn(
            f"drllm: DRLLM_OPS_BACKEND={value!r} is not one of {BACKENDS}; using 'auto'",
            RuntimeWarning,
            stacklevel=3,
        )
        return "auto"
    return value


# Context-local (per thread): set_backend in one caller never changes another caller's ops.
_MODE: ContextVar[str] = ContextVar("drllm_ops_backend", default=_parse_backend(os.environ.get("DRLLM_OPS_BACKEND")))


def _load_kernels():
    """The installed package ``drllm.kernels``, or None (with one warning) when it is missing or broken."""
    try:
        return importlib.import_module("drllm.kernels")
    except Exception as exc:  # not installed (a checkout on PYTHONPATH), or broken: the reference still works
        warnings.warn(
            f"drllm: cannot load drllm.kernels ({exc!r}); the pooling uses the PyTorch reference. "
            "Install drllm (`pip install --no-build-isolation -e .`) to get the Triton kernels.",
            RuntimeWarning,
            stacklevel=2,
        )
        return None


kernels = _load_kernels()  # the module drllm.kernels, or None

_ext_loaded = False
_ext_error: str | None = "not loaded (DRLLM_OPS_BACKEND=reference or DRLLM_NO_EXT=1)"
_ext_tried = False
_ext_hooks: list[Callable[[], object]] = []


def when_ext_loaded(hook: Callable[[], object]) -> None:
    """Run ``hook`` once drllm._C is loaded (now, if it is): torch registers a fake kernel only for an existing op."""
    if _ext_loaded:
        hook()
    else:
        _ext_hooks.append(hook)


def load_ext(stacklevel: int = 3) -> bool:
    """Load drllm._C once (registering ``torch.ops.drllm.*``); a missing or incompatible build gives one warning.

    Returns whether it is loaded. It never raises: the build may be absent (never
    built, built with ``DRLLM_NO_EXT=1``) or stale (built against another torch).
    """
    global _ext_loaded, _ext_error, _ext_tried
    if _ext_tried:
        return _ext_loaded
    _ext_tried = True
    try:
        from .. import _C  # noqa: F401  (registers torch.ops.drllm.*)

        for name in EXT_OPS:
            getattr(torch.ops.drllm, name)  # raises if the schema is missing (stale build)
    except Exception as exc:  # ImportError, OSError (ABI mismatch: undefined symbol), AttributeError
        _ext_error = f"{type(exc).__name__}: {exc}"
        warnings.warn(
            f"drllm: the C++/CUDA extension drllm._C is unavailable ({_ext_error}); row compaction, "
            "gather and scatter use the PyTorch reference. Build it with "
            "`pip install --no-build-isolation -e .`, or set DRLLM_NO_EXT=1 to silence this.",
            RuntimeWarning,
            stacklevel=stacklevel,
        )
    else:
        _ext_loaded, _ext_error = True, None
        for hook in _ext_hooks:
            hook()
        _ext_hooks.clear()
    return _ext_loaded


def has_kernel(op: str, device_type: str) -> bool:
    """Whether the loaded extension has a kernel of ``torch.ops.drllm.<op>`` for this device type ("cpu", "cuda")."""
    if not _ext_loaded:
        return False
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    if key is None:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"drllm::{op}", key)


if _MODE.get() != "reference" and not _env_flag("DRLLM_NO_EXT"):
    load_ext()  # at import (unless not wanted: then neither loaded nor warned about)

if _MODE.get() == "triton" and not (kernels is not None and kernels.HAS_TRITON):
    warnings.warn(
        "drllm: DRLLM_OPS_BACKEND=triton but triton is not installed; the pooling uses the PyTorch reference",
        RuntimeWarning,
        stacklevel=2,
    )


def set_backend(name: str | None) -> str:
    """Select the backend (one of :data:`BACKENDS`; None means ``auto``) in this thread; returns the previous one."""
    name = (name or "auto").strip().lower()
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected one of {BACKENDS}")
    previous = _MODE.get()
    _MODE.set(name)
    if name in ("auto", "ext") and not _env_flag("DRLLM_NO_EXT"):
        load_ext()
    return previous


def grad_needed(*tensors: torch.Tensor) -> bool:
    """Whether autograd records these tensors: only the reference has a backward."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def compiling() -> bool:
    """Whether torch.compile is tracing (data-dependent checks are skipped then)."""
    try:
        return torch.compiler.is_compiling()
    except AttributeError:  # older torch
        return False


def pooling_choice(device_type: str) -> str:
    """Pooling backend for a device type, before looking at the inputs."""
    mode = _MODE.get()
    if mode in ("reference", "ext") or kernels is None or not kernels.HAS_TRITON:
        return "reference"
    if device_type == "cuda":
        return "triton"
    if mode == "triton" and kernels.interpreting():
        return "triton"  # forced: CPU tensors through Triton's interpreter
    return "reference"


def rows_choice(op: str, device_type: str) -> str:
    """Row-op backend for a device type, before looking at the inputs."""
    if _MODE.get() in ("reference", "triton") or not _ext_loaded:
        return "reference"
    return "ext" if has_kernel(op, device_type) else "reference"


def backend(device: str | torch.device | None = None) -> dict:
    """What the ops use on ``device`` (default: ``cuda`` when available, else ``cpu``).

    ``pooling`` and ``rows`` name the backend that inputs on that device get
    (unless they need gradients or the fast path rejects them, then
    ``reference``); the other keys say what is installed.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device_type = torch.device(device).type
    return {
        "device": device_type,
        "mode": _MODE.get(),
        "pooling": pooling_choice(device_type),
        "rows": rows_choice("gather_rows", device_type),
        "triton": kernels.TRITON_VERSION if kernels is not None and kernels.HAS_TRITON else None,
        "triton_interpret": bool(kernels is not None and kernels.interpreting()),
        "ext": "loaded" if _ext_loaded else f"unavailable ({_ext_error})",
        "ext_devices": [d for d in ("cpu", "cuda") if has_kernel("gather_rows", d)],
    }
