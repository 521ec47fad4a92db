"""The fused Triton pooling + router kernel against the PyTorch reference.

On the CPU the kernel runs in Triton's interpreter: TRITON_INTERPRET must be
set before triton is first imported (triton decorates its own library at
import). drllm imports triton lazily, but transformers imports it, so when an
earlier import (the shared conftest) already loaded triton in compiled mode,
the interpreted tests run in a child pytest process started by
``test_interpreted_suite_in_subprocess``. Shapes are small; the GPU test
compiles the kernel for real in a fresh process.

Low-precision hidden states follow flash-attention's rule: the kernel's error
against a float64 reference must stay within a small multiple of the error of
PyTorch computing the same thing in that dtype.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from conftest import make_inputs  # noqa: E402

from drllm import ops  # noqa: E402

triton = pytest.importorskip("triton")

from drllm import kernels  # noqa: E402


def _interpreter_active() -> bool:
    # triton's library functions were decorated when triton was imported
    return type(triton.language.standard.sum).__name__ == "InterpretedFunction"


INTERPRETED = _interpreter_active()
CHILD = os.environ.get("_DRLLM_KERNEL_TESTS_CHILD") == "1"

interpreted = pytest.mark.skipif(
    not INTERPRETED,
    reason="triton was imported before TRITON_INTERPRET=1: run by test_interpreted_suite_in_subprocess",
)


@pytest.mark.skipif(INTERPRETED, reason="interpreter active: the tests run in this process")
def test_interpreted_suite_in_subprocess():
    env = {k: v for k, v in os.environ.items() if k != "DRLLM_OPS_BACKEND"}
    env.update(TRITON_INTERPRET="1", _DRLLM_KERNEL_TESTS_CHILD="1")
    cmd = [sys.executable, "-m", "pytest", __file__, "-q", "-x", "-p", "no:cacheprovider", "--noconftest"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert r.returncode == 0, r.stdout[-8000:] + r.stderr[-4000:]
    assert " passed" in r.stdout


def random_lengths(B, T, seed):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (B,), generator=gen).tolist()
    lengths[0] = T  # one full row
    if B > 1:
        lengths[-1] = 1  # one one-token prompt
    left = (torch.rand(B, generator=gen) > 0.5).tolist()
    return lengths, left


def punch_gaps(mask: torch.Tensor, seed: int) -> torch.Tensor:
    """``mask`` with random holes inside rows (as a ``routing_mask`` may have), each row keeping a real token."""
    gen = torch.Generator().manual_seed(seed)
    holes = torch.rand(mask.shape, generator=gen) < 0.35
    out = mask.masked_fill(holes, 0)
    for b in range(mask.shape[0]):
        if not out[b].any():
            out[b, int(mask[b].nonzero()[0])] = 1
    return out


CASES = [
    # B, T, H, num_windows
    (1, 1, 576, 8),  # one-token prompt
    (1, 6, 576, 8),  # T < num_windows
    (3, 29, 576, 8),
    (2, 40, 17, 8),  # small odd H
    (5, 19, 33, 8),
    (4, 70, 7, 8),  # several token tiles
    (17, 11, 31, 8),  # largest batch
    (3, 25, 576, 3),  # num_windows not a power of two
    (2, 9, 40, 1),
    (2, 21, 24, 20),  # more windows than a 16-wide tile
]


def check_low_precision(out, hidden, mask, nw, w1, b1, w2, b2):
    ref64 = ops.pooled_router_logits_loop(hidden, mask, nw, w1, b1, w2, b2, dtype=torch.float64)
    torch_lowp = ops.pooled_router_logits_loop(hidden, mask, nw, w1, b1, w2, b2, dtype=hidden.dtype)
    err = (out.double() - ref64).abs().max().item()
    err_torch = (torch_lowp.double() - ref64).abs().max().item()
    assert err <= 2 * err_torch + 1e-5, (err, err_torch)


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,T,H,nw", CASES)
def test_triton_matches_reference(B, T, H, nw, dtype):
    lengths, left = random_lengths(B, T, seed=B * 1000 + T + H)
    hidden, mask, w1, b1, w2, b2 = make_inputs(B, T, H, lengths, left, dtype, seed=H)
    out = kernels.pooled_router_logits_triton(hidden, mask, nw, w1, b1, w2, b2)
    ref = ops.pooled_router_logits_reference(hidden, mask, nw, w1, b1, w2, b2)
    assert out.dtype == torch.float32 and out.shape == (B, 3)
    # same fp32 accumulation of the same input values: tight, whatever the input dtype
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=2e-5)
    if dtype == torch.float32:
        ref64 = ops.pooled_router_logits_loop(hidden, mask, nw, w1, b1, w2, b2, dtype=torch.float64)
        torch.testing.assert_close(out.double(), ref64, rtol=1e-4, atol=2e-5)
    else:
        check_low_precision(out, hidden, mask, nw, w1, b1, w2, b2)


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,T,H,nw", CASES[1:8])
def test_triton_pools_masks_with_gaps_like_the_reference(B, T, H, nw, dtype):
    """Real tokens are ranked, not taken as one run from the first: a mask like 1110011111 pools its 8 tokens."""
    lengths, left = random_lengths(B, T, seed=B + T + H)
    hidden, mask, w1, b1, w2, b2 = make_inputs(B, T, H, lengths, left, dtype, seed=T)
    mask = punch_gaps(mask, seed=H)
    if T >= 10:
        mask[0, :10] = torch.tensor([1, 1, 1, 0, 0, 1, 1, 1, 1, 1])
    out = kernels.pooled_router_logits_triton(hidden, mask, nw, w1, b1, w2, b2)
    loop = ops.pooled_router_logits_loop(hidden, mask, nw, w1, b1, w2, b2, dtype=torch.float32)
    torch.testing.assert_close(out, ops.pooled_router_logits_reference(hidden, mask, nw, w1, b1, w2, b2), rtol=1e-4, atol=2e-5)
    torch.testing.assert_close(out, loop, rtol=1e-4, atol=2e-5)


@interpreted
@pytest.mark.parametrize("block_t,block_h", [(16, 16), (32, 64)])
def test_triton_small_tiles(block_t, block_h):
    """GPU-sized tiles: several H slices summed in the head kernel, several token tiles."""
    hidden, mask, w1, b1, w2, b2 = make_inputs(3, 45, 100, [45, 20, 1], [True, False, True], torch.bfloat16)
    out = kernels.pooled_router_logits_triton(hidden, mask, 8, w1, b1, w2, b2, block_t=block_t, block_h=block_h)
    ref = ops.pooled_router_logits_reference(hidden, mask, 8, w1, b1, w2, b2)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=2e-5)


@interpreted
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.int32, torch.float32])
def test_triton_mask_dtypes_and_non_contiguous_hidden(mask_dtype):
    B, T, H = 3, 14, 24
    hidden, mask, w1, b1, w2, b2 = make_inputs(B, T, H, [14, 5, 1], [False, True, False], torch.float32, mask_dtype=mask_dtype)
    strided = torch.randn(B, H, T).transpose(1, 2)  # [B, T, H] with stride(2) = T
    strided.copy_(hidden)
    assert not strided.is_contiguous()
    out = kernels.pooled_router_logits_triton(strided, mask, 8, w1, b1, w2, b2)
    ref = ops.pooled_router_logits_reference(hidden, mask, 8, w1, b1, w2, b2)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=2e-5)


@interpreted
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the NaN row
def test_dispatch_forced_triton_on_cpu(monkeypatch):
    hidden, mask, w1, b1, w2, b2 = make_inputs(2, 10, 16, [10, 3], [True, False], torch.float32)
    calls = []
    real = kernels.pooled_router_logits_triton
    monkeypatch.setattr(kernels, "pooled_router_logits_triton", lambda *a, **k: calls.append(1) or real(*a, **k))
    prev = ops.set_backend("auto")
    try:
        ops.pooled_router_logits(hidden, mask, 8, w1, b1, w2, b2)
        assert calls == []  # CPU tensors take the reference by default
        ops.set_backend("triton")
        assert ops.backend("cpu")["pooling"] == "triton"
        out = ops.pooled_router_logits(hidden, mask, 8, w1, b1, w2, b2)
        assert calls == [1]
        torch.testing.assert_close(out, ops.pooled_router_logits_reference(hidden, mask, 8, w1, b1, w2, b2), rtol=1e-4, atol=2e-5)
        # needs gradients -> reference, still correct
        w1g = w1.clone().requires_grad_(True)
        ops.pooled_router_logits(hidden, mask, 8, w1g, b1, w2, b2).sum().backward()
        assert calls == [1] and w1g.grad is not None
        # empty rows: an error by default, NaN on request
        mask[1] = 0
        with pytest.raises(ValueError, match="empty prompt"):
            ops.pooled_router_logits(hidden, mask, 8, w1, b1, w2, b2)
        out = ops.pooled_router_logits(hidden, mask, 8, w1, b1, w2, b2, validate=False)
        assert torch.isfinite(out[0]).all() and torch.isnan(out[1]).all()
    finally:
        ops.set_backend(prev)


@pytest.mark.skipif(not torch.cuda.is_available() or CHILD, reason="needs a GPU")
def test_triton_compiled_on_cuda():
    """The compiled kernel (fresh process, no interpreter) on CUDA tensors."""
    code = textwrap.dedent(
        """
        import torch
        from drllm import ops
        torch.manual_seed(0)
        assert ops.backend("cuda")["pooling"] == "triton", ops.backend("cuda")
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            for B, T, H in ((1, 1, 576), (17, 150, 576), (5, 33, 17), (4, 300, 4096)):
                hidden = torch.randn(B, T, H, device="cuda").to(dtype)
                lengths = torch.randint(1, T + 1, (B,)); lengths[0] = T
                ar = torch.arange(T)
                left = torch.rand(B) > 0.5
                mask = torch.where(left[:, None], ar[None] >= T - lengths[:, None], ar[None] < lengths[:, None]).long()
                holes = (torch.rand(B, T) < 0.3) & (ar[None] != ar[None].where(mask.bool(), T).min(1, keepdim=True).values)
                mask = mask.masked_fill(holes, 0).cuda()  # gaps inside rows, the first real token kept
                w1 = torch.nn.init.xavier_uniform_(torch.empty(128, H, device="cuda"))
                w2 = torch.nn.init.xavier_uniform_(torch.empty(3, 128, device="cuda"))
                b1 = 0.1 * torch.randn(128, device="cuda"); b2 = 0.1 * torch.randn(3, device="cuda")
                out = ops.pooled_router_logits(hidden, mask, 8, w1, b1, w2, b2)
                ref = ops.pooled_router_logits_reference(hidden, mask, 8, w1, b1, w2, b2)
                torch.testing.assert_close(out, ref, rtol=1e-4, atol=5e-5)
                ref64 = ops.pooled_router_logits_loop(hidden, mask, 8, w1, b1, w2, b2, dtype=torch.float64)
                lowp = ops.pooled_router_logits_loop(hidden, mask, 8, w1, b1, w2, b2, dtype=dtype)
                err = (out.double() - ref64).abs().max().item()
                err_torch = (lowp.double() - ref64).abs().max().item()
                assert err <= 2 * err_torch + 5e-5, (dtype, B, T, H, err, err_torch)
        print("ok")
        """
    )
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "DRLLM_OPS_BACKEND")}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.strip().endswith("ok")


@interpreted
@settings(max_examples=6, deadline=None)
@given(
    B=st.integers(1, 9),
    T=st.integers(1, 40),
    H=st.sampled_from([1, 3, 17, 130, 576]),
    nw=st.integers(1, 12),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    seed=st.integers(0, 2**16),
    gaps=st.booleans(),
)
def test_triton_random_shapes(B, T, H, nw, dtype, seed, gaps):
    lengths, left = random_lengths(B, T, seed)
    hidden, mask, w1, b1, w2, b2 = make_inputs(B, T, H, lengths, left, dtype, seed=seed)
    if gaps:
        mask = punch_gaps(mask, seed)
    out = kernels.pooled_router_logits_triton(hidden, mask, nw, w1, b1, w2, b2)
    ref = ops.pooled_router_logits_reference(hidden, mask, nw, w1, b1, w2, b2)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=2e-5)
