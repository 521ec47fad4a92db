"""The PyTorch reference ops against explicit per-row loops, and the dispatcher.

The reference pooling is vectorised (window weights + bmm); here it is checked
against the definition: per row, take the real tokens, torch.tensor_split them
into min(num_windows, T_real) windows, run the router MLP on each window's
mean, average the logits.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from conftest import make_inputs

from drllm import ops
from drllm.ops import backends


def loop_pooled_logits(hidden, mask, num_windows, w1, b1, w2, b2):
    """The definition, one row and one window at a time, in float64."""
    rows = []
    for b in range(hidden.shape[0]):
        tokens = hidden[b, mask[b].bool()].double()
        windows = torch.tensor_split(tokens, min(num_windows, tokens.shape[0]), dim=0)
        logits = []
        for w in windows:
            h = F.gelu(w.mean(0) @ w1.double().T + b1.double(), approximate="tanh")
            logits.append(h @ w2.double().T + b2.double())
        rows.append(sum(logits) / len(logits))
    return torch.stack(rows)


CASES = [
    # B, T, H, lengths, left_pad, num_windows
    (1, 1, 8, [1], [False], 8),  # one-token prompt
    (1, 5, 8, [5], [True], 8),  # T < num_windows
    (3, 20, 16, [20, 7, 1], [False, True, True], 8),
    (4, 37, 24, [37, 16, 17, 9], [True, False, True, False], 8),
    (2, 30, 12, [30, 29], [False, True], 1),  # one window: the plain mean
    (2, 12, 12, [12, 3], [True, False], 5),
    (5, 64, 32, [64, 63, 8, 9, 2], [False, True, False, True, False], 16),
]


@pytest.mark.parametrize("B,T,H,lengths,left_pad,nw", CASES)
@pytest.mark.parametrize("mask_dtype", [torch.long, torch.bool, torch.float32])
def test_reference_matches_loop(B, T, H, lengths, left_pad, nw, mask_dtype):
    hidden, mask, w1, b1, w2, b2 = make_inputs(B, T, H, lengths, left_pad, mask_dtype=mask_dtype)
    ref = ops.pooled_router_logits_reference(hidden, mask, nw, w1, b1, w2, b2)
    loop = loop_pooled_logits(hidden, mask, nw, w1, b1, w2, b2)
    assert ref.dtype == torch.float32 and ref.shape == (B, 3)
    torch.testing.assert_close(ref.double(), loop, rtol=1e-5, atol=1e-6)
    # the library's own loop oracle agrees too
    torch.testing.assert_close(ops.pooled_router_logits_loop(hidden, mask, nw, w1, b1, w2, b2, dtype=torch.float64), loop)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reference_low_precision_hidden_accumulates_in_fp32(dtype):
    hidden, mask, w1, b1, w2, b2 = make_inputs(3, 40, 32, [40, 13, 2], [True, False, True], dtype=dtype)
    ref = ops.pooled_router_logits_reference(hidden, mask, 8, w1, b1, w2, b2)
    assert ref.dtype == torch.float32
    # the loop upcasts the same low-precision values to float64: fp32 accumulation is that close
    torch.testing.assert_close(ref.double(), loop_pooled_logits(hidden, mask, 8, w1, b1, w2, b2), rtol=1e-5, atol=1e-6)


@settings(max_examples=40, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 23), min_size=1, max_size=6),
    extra=st.integers(0, 5),
    nw=st.integers(1, 12),
    left=st.lists(st.booleans(), min_size=6, max_size=6),
)
def test_reference_matches_loop_random(lengths, extra, nw, left):
    T = max(lengths) + extra
    hidden, mask, w1, b1, w2, b2 = make_inputs(len(lengths), T, 6, lengths, left[: len(lengths)], seed=T)
    ref = ops.pooled_router_logits_reference(hidden, mask, nw, w1, b1, w2, b2)
    torch.testing.assert_close(ref.double(), loop_pooled_logits(hidden, mask, nw, w1, b1, w2, b2), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n,nw", [(1, 8), (5, 8), (8, 8), (9, 8), (17, 8), (150, 8), (7, 3)])
def test_window_weights_are_tensor_split(n, nw):
    T = n + 3
    mask = torch.zeros(2, T, dtype=torch.long)
    mask[0, :n] = 1  # right padding
    mask[1, T - n :] = 1  # left padding
    w = ops.window_weights(mask, nw)
    assert w.shape == (2, nw, T)
    for b in range(2):
        pos = torch.nonzero(mask[b]).flatten()
        chunks = torch.tensor_split(pos, min(nw, n))
        for k in range(nw):
            expected = torch.zeros(T)
            if k < len(chunks):
                expected[chunks[k]] = 1.0 / len(chunks[k])
            torch.testing.assert_close(w[b, k], expected)
    means, valid = ops.window_means(torch.randn(2, T, 4), mask, nw)
    assert valid.sum(1).tolist() == [min(nw, n)] * 2


def test_empty_prompt_raises():
    hidden, mask, w1, b1, w2, b2 = make_inputs(2, 4, 8, [4, 1], [False, False])
    mask[1] = 0
    with pytest.raises(ValueError, match="empty prompt"):
        ops.pooled_router_logits_reference(hidden, mask, 8, w1, b1, w2, b2)
    with pytest.raises(ValueError, match="empty prompt"):
        ops.pooled_router_logits(hidden, mask, 8, w1, b1, w2, b2)


def test_router_mlp_is_linear_gelu_linear():
    gen = torch.Generator().manual_seed(0)
    x, w1, b1 = torch.randn(5, 7, generator=gen), torch.randn(128, 7, generator=gen), torch.randn(128, generator=gen)
    w2, b2 = torch.randn(3, 128, generator=gen), torch.randn(3, generator=gen)
    mlp = torch.nn.Sequential(torch.nn.Linear(7, 128), torch.nn.GELU(approximate="tanh"), torch.nn.Linear(128, 3))
    with torch.no_grad():
        mlp[0].weight.copy_(w1), mlp[0].bias.copy_(b1), mlp[2].weight.copy_(w2), mlp[2].bias.copy_(b2)
        torch.testing.assert_close(ops.router_mlp(x, w1, b1, w2, b2), mlp(x))


# ----------------------------------------------------------------------------- row ops


@pytest.mark.parametrize("B", [0, 1, 6, 31])
def test_compact_rows_reference_matches_loop(B):
    d = torch.randint(0, 3, (B,), generator=torch.Generator().manual_seed(B))
    p1, p2 = ops.compact_rows_reference(d)
    assert p1.tolist() == [i for i in range(B) if d[i] >= 1]
    assert p2.tolist() == [i for i in range(B) if d[i] == 2]
    assert p1.dtype == p2.dtype == torch.int64
    q1, q2 = ops.compact_rows(d)  # whatever backend is active
    assert torch.equal(q1, p1) and torch.equal(q2, p2)


def test_gather_scatter_reference_match_loop():
    x = torch.randn(6, 3, 4)
    idx = torch.tensor([5, 1, 2])
    g = ops.gather_rows_reference(x, idx)
    for j, i in enumerate(idx.tolist()):
        assert torch.equal(g[j], x[i])
    src = torch.randn(3, 3, 4)
    s = ops.scatter_rows_reference(x, idx, src)
    for r in range(6):
        expected = src[idx.tolist().index(r)] if r in idx.tolist() else x[r]
        assert torch.equal(s[r], expected)
    assert torch.equal(ops.gather_rows(x, idx), g)
    assert torch.equal(ops.scatter_rows(x, idx, src), s)


# ----------------------------------------------------------------------------- dispatch


def test_backend_report():
    info = ops.backend("cpu")
    assert info["device"] == "cpu"
    assert info["pooling"] in ("reference", "triton") and info["rows"] in ("reference", "ext")
    if info["mode"] == "auto":
        assert info["pooling"] == "reference"  # Triton only for CUDA tensors by default
    assert ops.backend("cuda")["device"] == "cuda"


def test_set_backend_validates_and_restores():
    prev = ops.set_backend("reference")
    try:
        assert ops.backend("cpu")["pooling"] == "reference" and ops.backend("cpu")["rows"] == "reference"
        assert ops.backend("cuda")["pooling"] == "reference"
        with pytest.raises(ValueError):
            ops.set_backend("cuda-graphs")
    finally:
        ops.set_backend(prev)


def test_pooling_with_gradients_uses_reference():
    hidden, mask, w1, b1, w2, b2 = make_inputs(2, 9, 8, [9, 4], [True, False])
    w1.requires_grad_(True)
    out = ops.pooled_router_logits(hidden, mask, 8, w1, b1, w2, b2)
    out.sum().backward()
    assert w1.grad is not None and torch.isfinite(w1.grad).all()


@pytest.mark.parametrize("forced", ["reference", "triton", "ext", "auto"])
def test_forced_backend(forced):
    prev = ops.set_backend(forced)
    try:
        info = ops.backend("cpu")
        assert info["mode"] == forced
        if forced == "reference":
            assert info["pooling"] == "reference" and info["rows"] == "reference"
            assert ops.backend("cuda")["pooling"] == "reference"
        if forced == "ext":
            assert info["pooling"] == "reference" and ops.backend("cuda")["pooling"] == "reference"
        if forced == "triton":
            assert info["rows"] == "reference"
            if info["triton"]:
                assert ops.backend("cuda")["pooling"] == "triton"
                assert info["pooling"] == ("triton" if info["triton_interpret"] else "reference")
        if forced == "auto":
            assert info["pooling"] == "reference"
            assert ops.backend("cuda")["pooling"] == ("triton" if info["triton"] else "reference")
    finally:
        ops.set_backend(prev)


def test_env_var_parsing():
    assert backends._parse_backend(None) == "auto"
    assert backends._parse_backend(" Triton ") == "triton"
    with pytest.warns(RuntimeWarning, match="DRLLM_OPS_BACKEND"):
        assert backends._parse_backend("fast") == "auto"


def test_import_without_extension_or_triton():
    """A fresh interpreter where drllm._C and triton cannot be imported: one
    warning, every op on the reference, DRLLM_OPS_BACKEND read at import."""
    code = (
        "import sys, warnings\n"
        "sys.modules['drllm._C'] = None\n"  # as if never built
        "sys.modules['triton'] = None\n"  # as if not installed
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    import torch, drllm.ops as o\n"
        "    import drllm.ops\n"
        "    p1, p2 = o.compact_rows(torch.tensor([0, 2, 1]))\n"
        "    assert p1.tolist() == [1, 2] and p2.tolist() == [1]\n"
        "    x = torch.randn(3, 2); assert torch.equal(o.gather_rows(x, p1), x[1:])\n"
        "    h = torch.randn(2, 5, 8); m = torch.ones(2, 5)\n"
        "    out = o.pooled_router_logits(h, m, 8, torch.randn(128, 8), torch.zeros(128), torch.randn(3, 128), torch.zeros(3))\n"
        "    assert out.shape == (2, 3)\n"
        "ext_warnings = [m for m in w if 'drllm._C' in str(m.message)]\n"
        "info = o.backend('cuda')\n"
        "print(len(ext_warnings), info['mode'], info['pooling'], info['rows'], info['triton'])\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("DRLLM_OPS_BACKEND", "DRLLM_NO_EXT")}
    env["DRLLM_OPS_BACKEND"] = "triton"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[-5:] == ["1", "triton", "reference", "reference", "None"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pooling_op_passes_opcheck_and_equals_the_reference(dtype):
    """``torch.ops.drllm.pooled_router_logits`` (torch.library): schema, fake kernel and dispatch are consistent."""
    hidden, mask, w1, b1, w2, b2 = make_inputs(3, 11, 24, [11, 4, 1], [True, False, True], dtype)
    mask[0, 3:5] = 0  # a gap, as a routing mask may have
    args = (hidden, mask, 5, w1, b1, w2, b2)
    torch.library.opcheck(torch.ops.drllm.pooled_router_logits.default, args)
    out = torch.ops.drllm.pooled_router_logits(*args)
    assert out.dtype == torch.float32 and out.shape == (3, 3)
    torch.testing.assert_close(out, ops.pooled_router_logits_reference(*args))
