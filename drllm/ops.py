"""Hot-path ops of the routed runtime.

The ``*_reference`` functions (and the bodies they call) are the
specification: plain PyTorch. The public functions :func:`pooled_router_logits`,
:func:`compact_rows`, :func:`gather_rows` and :func:`scatter_rows` dispatch to
a fast path when one applies and fall back to the reference otherwise:

- pooling + router MLP: the operator ``torch.ops.drllm.pooled_router_logits``
  (registered here with ``torch.library``, so the dispatcher and
  torch.compile see one op): the fused Triton kernel (``drllm.kernels``) for
  CUDA tensors, the reference on the CPU (faster there than Triton's
  interpreter);
- row compaction, gather, scatter: the C++/CUDA extension ``drllm._C``
  (``torch.ops.drllm.*``), on the CPU and, when built with CUDA, on the GPU.

The reference is used whenever a fast path does not apply: gradients are
required (the fast paths have no backward), the device or dtype is not
supported, or the fast path is not installed. A missing or incompatible extension gives one warning at import
(none when ``DRLLM_NO_EXT=1`` is also set at run time: then it is not loaded).

``DRLLM_OPS_BACKEND`` (read at import; :func:`set_backend` changes it for the
calling thread only) selects: ``auto`` (default), ``reference`` (PyTorch everywhere), ``triton``
(Triton for the pooling wherever it can run, including CPU tensors when
``TRITON_INTERPRET=1``; the reference for row ops) or ``ext`` (the extension for
row ops; the reference for the pooling). :func:`backend` reports the choice.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import pathlib
import sys
import warnings
from contextvars import ContextVar

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "reference", "triton", "ext")


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
    """``drllm.kernels``: installed (wheel or editable install), else from ``kernels/`` beside a source checkout."""
    if importlib.util.find_spec("drllm.kernels") is not None:
        return importlib.import_module("drllm.kernels")
    path = pathlib.Path(__file__).resolve().parent.parent / "kernels" / "__init__.py"
    if not path.is_file():
        return None
    spec = importlib.util.spec_from_file_location("drllm.kernels", path, submodule_search_locations=[str(path.parent)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["drllm.kernels"] = module
    try:
        spec.loader.exec_module(module)
    except Exception:
        del sys.modules["drllm.kernels"]
        raise
    return module


try:
    _kernels = _load_kernels()
except Exception as _exc:  # a broken checkout must not break the reference ops
    warnings.warn(f"drllm: cannot load drllm.kernels ({_exc!r}); the pooling uses the PyTorch reference", RuntimeWarning)
    _kernels = None

_ext = None
_EXT_ERROR: str | None = "not loaded (DRLLM_OPS_BACKEND=reference or DRLLM_NO_EXT=1)"
_ext_tried = False


def _load_ext(stacklevel: int = 3) -> None:
    """Load drllm._C once; a missing or incompatible build gives one warning."""
    global _ext, _EXT_ERROR, _ext_tried
    if _ext_tried:
        return
    _ext_tried = True
    from drllm import _ext as ext

    _EXT_ERROR = ext.ERROR
    if ext.LOADED:
        _ext = ext
    else:
        warnings.warn(
            f"drllm: the C++/CUDA extension drllm._C is unavailable ({ext.ERROR}); row compaction, "
            "gather and scatter use the PyTorch reference. Build it with "
            "`pip install --no-build-isolation -e .`, or set DRLLM_NO_EXT=1 to silence this.",
            RuntimeWarning,
            stacklevel=stacklevel,
        )


if _MODE.get() != "reference" and not _env_flag("DRLLM_NO_EXT"):
    _load_ext()  # at import (unless not wanted: then neither loaded nor warned about)

if _MODE.get() == "triton" and not (_kernels is not None and _kernels.HAS_TRITON):
    warnings.warn(
        "drllm: DRLLM_OPS_BACKEND=triton but triton is not installed; the pooling uses the PyTorch reference",
        RuntimeWarning,
        stacklevel=2,
    )


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
    """Reference for :func:`pooled_router_logits`."""
    require_real_tokens(mask)
    return weighted_router_logits(window_weights(mask, num_windows), hidden, w1, b1, w2, b2)


def pooled_router_logits_loop(hidden, mask, num_windows, w1, b1, w2, b2, *, dtype=torch.float32):
    """Naive oracle of :func:`pooled_router_logits`: a Python loop over rows and windows.

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


# --------------------------------------------------------------------------- dispatch


def set_backend(name: str | None) -> str:
    """Select the backend (one of :data:`BACKENDS`; None means ``auto``) in this thread; returns the previous one."""
    name = (name or "auto").strip().lower()
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected one of {BACKENDS}")
    previous = _MODE.get()
    _MODE.set(name)
    if name in ("auto", "ext") and not _env_flag("DRLLM_NO_EXT"):
        _load_ext()
    return previous


def _grad_needed(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _compiling() -> bool:
    try:
        return torch.compiler.is_compiling()
    except AttributeError:  # older torch
        return False


def pooling_choice(device_type: str) -> str:
    """Pooling backend for a device type, before looking at the inputs."""
    mode = _MODE.get()
    if mode in ("reference", "ext") or _kernels is None or not _kernels.HAS_TRITON:
        return "reference"
    if device_type == "cuda":
        return "triton"
    if mode == "triton" and _kernels.interpreting():
        return "triton"  # forced: CPU tensors through Triton's interpreter
    return "reference"


def _rows_choice(op: str, device_type: str) -> str:
    """Row-op backend for a device type, before looking at the inputs."""
    if _MODE.get() in ("reference", "triton") or _ext is None:
        return "reference"
    return "ext" if _ext.has_kernel(op, device_type) else "reference"


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
        "rows": _rows_choice("gather_rows", device_type),
        "triton": _kernels.TRITON_VERSION if _kernels is not None and _kernels.HAS_TRITON else None,
        "triton_interpret": bool(_kernels is not None and _kernels.interpreting()),
        "ext": "loaded" if _ext is not None else f"unavailable ({_EXT_ERROR})",
        "ext_devices": [d for d in ("cpu", "cuda") if _ext is not None and _ext.has_kernel("gather_rows", d)],
    }


def _fused_or_reference(hidden, mask, num_windows, w1, b1, w2, b2):
    """The fused Triton kernel where this thread's backend picks it for the device and it takes the inputs, else the reference."""
    if pooling_choice(hidden.device.type) == "triton" and _kernels.supports(hidden, mask, w1, w2):
        return _kernels.pooled_router_logits_triton(hidden, mask, num_windows, w1, b1, w2, b2)
    return weighted_router_logits(window_weights(mask, num_windows), hidden, w1, b1, w2, b2)  # checked by the caller


# One operator for the dispatcher and the compiler: ``triton_op`` lets torch.compile see the Triton
# kernels inside (on CUDA) and trace the reference on the CPU; custom_op when triton is absent.
_define_op = torch.library.triton_op if _kernels is not None and _kernels.HAS_TRITON else torch.library.custom_op


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
    if _grad_needed(hidden, w1, b1, w2, b2):
        return pooled_router_logits_reference(hidden, mask, num_windows, w1, b1, w2, b2)
    if validate and not _compiling() and hidden.shape[0] > 0:
        require_real_tokens(mask)
    return torch.ops.drllm.pooled_router_logits(hidden, mask, num_windows, w1, b1, w2, b2)


def compact_rows_reference(decisions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference for :func:`compact_rows`."""
    return (
        torch.nonzero(decisions >= 1).flatten(),
        torch.nonzero(decisions == 2).flatten(),
    )


def gather_rows_reference(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Reference for :func:`gather_rows`."""
    return x.index_select(0, index)


def scatter_rows_reference(base: torch.Tensor, index: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """Reference for :func:`scatter_rows`."""
    return base.index_copy(0, index, src)


def compact_rows(decisions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row indices (int64, ascending) that run pass one (decision >= 1) and pass two (== 2)."""
    if decisions.dim() == 1 and _rows_choice("compact_rows", decisions.device.type) == "ext":
        return torch.ops.drllm.compact_rows(decisions)
    return compact_rows_reference(decisions)


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows ``x[index]`` as a new contiguous tensor."""
    if _rows_choice("gather_rows", x.device.type) == "ext" and not _grad_needed(x):
        return torch.ops.drllm.gather_rows(x, index)
    return gather_rows_reference(x, index)


def scatter_rows(base: torch.Tensor, index: torch.Tensor, src: torch.Tensor, *, inplace: bool = False) -> torch.Tensor:
    """A copy of ``base`` whose rows ``index`` are replaced by ``src``.

    With ``inplace=True`` the rows of ``base`` itself are replaced and ``base``
    is returned (no copy of the other rows). ``index`` must not repeat a row.
    """
    op = "scatter_rows_" if inplace else "scatter_rows"
    if _rows_choice(op, base.device.type) == "ext" and not _grad_needed(base, src):
        if inplace:
            torch.ops.drllm.scatter_rows_(base, index, src)
            return base
        return torch.ops.drllm.scatter_rows(base, index, src)
    if inplace:
        return base.index_copy_(0, index, src)
    return scatter_rows_reference(base, index, src)
