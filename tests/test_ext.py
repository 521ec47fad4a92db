"""The C++/CUDA extension drllm._C against the PyTorch reference ops.

Row ops copy bytes, so results must be bit-identical to index_select /
index_copy. CUDA tests skip without a GPU (or without a CUDA build).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from drllm import ops
from drllm.ops import backends

# loaded here whatever DRLLM_OPS_BACKEND says: these tests are about the extension itself
pytestmark = pytest.mark.skipif(not backends.load_ext(), reason=f"drllm._C not built: {ops.backend('cpu')['ext']}")

HAS_CUDA_EXT = torch.cuda.is_available() and ops.has_kernel("gather_rows", "cuda")
cuda_only = pytest.mark.skipif(not HAS_CUDA_EXT, reason="needs a GPU and drllm._C built with CUDA")

DEVICES = ["cpu", pytest.param("cuda", marks=cuda_only)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.int8, torch.bool]


def _random(shape, dtype, device, gen):
    if dtype == torch.bool:
        return torch.rand(shape, generator=gen) > 0.5
    if dtype.is_floating_point:
        return torch.randn(shape, generator=gen).to(dtype)
    return torch.randint(-100, 100, shape, generator=gen).to(dtype)


# ----------------------------------------------------------------------------- compact_rows


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("B", [0, 1, 2, 7, 64, 1000, 70_001])  # 70_001 spans several parallel chunks
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.int8, torch.uint8, torch.float32])
def test_compact_rows_matches_reference(device, B, dtype):
    gen = torch.Generator().manual_seed(B)
    d = torch.randint(0, 3, (B,), generator=gen).to(dtype).to(device)
    p1, p2 = torch.ops.drllm.compact_rows(d)
    r1, r2 = ops.compact_rows_reference(d)
    assert p1.dtype == p2.dtype == torch.int64
    assert p1.device == d.device
    assert torch.equal(p1, r1) and torch.equal(p2, r2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fill", [0, 1, 2])
def test_compact_rows_uniform(device, fill):
    d = torch.full((33,), fill, dtype=torch.long, device=device)
    p1, p2 = torch.ops.drllm.compact_rows(d)
    assert p1.tolist() == (list(range(33)) if fill >= 1 else [])
    assert p2.tolist() == (list(range(33)) if fill == 2 else [])


def test_compact_rows_non_contiguous():
    d = torch.tensor([[0, 1], [2, 0], [1, 2], [2, 2]]).t()[0]  # stride 2
    assert not d.is_contiguous()
    p1, p2 = torch.ops.drllm.compact_rows(d)
    assert p1.tolist() == [1, 2, 3] and p2.tolist() == [1, 3]


def test_compact_rows_rejects_2d():
    with pytest.raises(RuntimeError, match="1-D"):
        torch.ops.drllm.compact_rows(torch.zeros(2, 2, dtype=torch.long))


# ----------------------------------------------------------------------------- gather / scatter


def _index_cases(B, gen):
    perm = torch.randperm(B, generator=gen)
    k = max(1, B // 2)
    return {
        "empty": torch.zeros(0, dtype=torch.long),
        "all": torch.arange(B),
        "sorted_subset": perm[:k].sort().values,
        "permuted_subset": perm[:k],
        "reversed": torch.arange(B).flip(0),
    }


SHAPES = [(5,), (6, 3), (9, 7, 33), (4, 16, 64), (3, 5, 4, 2)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_gather_rows_matches_reference(device, dtype, shape):
    gen = torch.Generator().manual_seed(len(shape) * 7 + shape[0])
    x = _random(shape, dtype, device, gen).to(device)
    for name, idx in _index_cases(shape[0], gen).items():
        for idx_dtype in (torch.int64, torch.int32):
            i = idx.to(idx_dtype).to(device)
            out = torch.ops.drllm.gather_rows(x, i)
            ref = ops.gather_rows_reference(x, i)
            assert out.is_contiguous(), name
            assert out.dtype == x.dtype and out.shape == ref.shape, name
            assert torch.equal(out, ref), name


@pytest.mark.parametrize("device", DEVICES)
def test_gather_rows_repeated_indices(device):
    x = torch.randn(4, 3, 5, device=device)
    i = torch.tensor([3, 3, 0, 3, 1], device=device)
    assert torch.equal(torch.ops.drllm.gather_rows(x, i), x[i])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_scatter_rows_matches_reference(device, dtype, shape):
    gen = torch.Generator().manual_seed(len(shape) * 11 + shape[0])
    base = _random(shape, dtype, device, gen).to(device)
    for name, idx in _index_cases(shape[0], gen).items():
        src = _random((idx.numel(), *shape[1:]), dtype, device, gen).to(device)
        i = idx.to(device)
        before = base.clone()
        out = torch.ops.drllm.scatter_rows(base, i, src)
        ref = ops.scatter_rows_reference(base, i, src)
        assert torch.equal(base, before), "scatter_rows must not modify base"
        assert out.is_contiguous() and out.data_ptr() != base.data_ptr()
        assert torch.equal(out, ref), name
        # in place
        b2 = base.clone()
        torch.ops.drllm.scatter_rows_(b2, i.to(torch.int32), src)
        assert torch.equal(b2, ref), name


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["row_strided", "sliced_inner", "transposed", "expanded"])
def test_rows_non_contiguous_inputs(device, layout):
    gen = torch.Generator().manual_seed(0)

    def make():  # a fresh, non-contiguous view of the given layout
        big = torch.randn(12, 10, 16, generator=gen).to(device)
        if layout == "row_strided":  # rows are contiguous blocks, the row stride is doubled
            return big[::2]
        if layout == "sliced_inner":  # rows are not contiguous blocks
            return big[:, 2:7]
        if layout == "transposed":
            return big.transpose(1, 2)
        return big[:1].expand(6, 10, 16)  # stride 0 over rows

    x = make()
    assert not x.is_contiguous()
    idx = torch.tensor([x.shape[0] - 1, 0, 2], device=device)
    assert torch.equal(torch.ops.drllm.gather_rows(x, idx), x.index_select(0, idx))
    src = make()[:3]  # non-contiguous source rows too
    assert torch.equal(torch.ops.drllm.scatter_rows(x, idx, src), x.index_copy(0, idx, src))
    if layout != "expanded":  # an expanded tensor cannot be written in place
        ref = x.clone().index_copy_(0, idx, src)
        torch.ops.drllm.scatter_rows_(x, idx, src)
        assert torch.equal(x, ref)


@pytest.mark.parametrize("device", DEVICES)
def test_rows_bounds_and_shape_errors(device):
    x = torch.randn(4, 3, device=device)
    if device == "cpu":  # CUDA checks bounds with a device-side assert (fatal to the context)
        with pytest.raises(RuntimeError, match="out of bounds"):
            torch.ops.drllm.gather_rows(x, torch.tensor([4]))
        with pytest.raises(RuntimeError, match="out of bounds"):
            torch.ops.drllm.scatter_rows(x, torch.tensor([-1]), torch.randn(1, 3))
    with pytest.raises(RuntimeError, match="int64 or int32"):
        torch.ops.drllm.gather_rows(x, torch.tensor([0.0], device=device))
    with pytest.raises(RuntimeError, match="rows"):
        torch.ops.drllm.scatter_rows(x, torch.tensor([0, 1], device=device), torch.randn(3, 3, device=device))
    with pytest.raises(RuntimeError, match="dtype"):
        torch.ops.drllm.scatter_rows(x, torch.tensor([0], device=device), torch.randn(1, 3, device=device).double())


# ----------------------------------------------------------------------------- torch.library checks


def _opcheck_cases(device):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(6, 4, 8, generator=gen).to(device)
    idx = torch.tensor([4, 1, 5], device=device)
    src = torch.randn(3, 4, 8, generator=gen).to(device)
    return [
        (torch.ops.drllm.compact_rows.default, (torch.tensor([0, 2, 1, 0, 2], device=device),)),
        (torch.ops.drllm.compact_rows.default, (torch.zeros(3, dtype=torch.int32, device=device),)),
        (torch.ops.drllm.gather_rows.default, (x, idx)),
        (torch.ops.drllm.gather_rows.default, (x, idx[:0])),
        (torch.ops.drllm.scatter_rows.default, (x, idx, src)),
        (torch.ops.drllm.scatter_rows_.default, (x.clone(), idx, src)),
    ]


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    for op, args in _opcheck_cases(device):
        torch.library.opcheck(op, args)


def test_fake_compact_rows_has_dynamic_size():
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    with FakeTensorMode(shape_env=ShapeEnv()):
        p1, p2 = torch.ops.drllm.compact_rows(torch.empty(7, dtype=torch.long))
        g = torch.ops.drllm.gather_rows(torch.empty(7, 3, 5), torch.empty(4, dtype=torch.long))
    assert isinstance(p1.shape[0], torch.SymInt) and isinstance(p2.shape[0], torch.SymInt)
    assert p1.dtype == torch.int64
    assert tuple(g.shape) == (4, 3, 5)


def test_fakes_registered_when_the_extension_loads_after_import():
    """Not loaded at import (DRLLM_OPS_BACKEND=reference): set_backend loads it, and its fakes come with it."""
    code = (
        "import torch, drllm.ops as o\n"
        "from torch._subclasses.fake_tensor import FakeTensorMode\n"
        "assert o.backend('cpu')['ext'].startswith('unavailable')\n"
        "o.set_backend('auto')\n"
        "assert o.backend('cpu')['rows'] == 'ext'\n"
        "with FakeTensorMode():\n"
        "    g = torch.ops.drllm.gather_rows(torch.empty(7, 3), torch.empty(4, dtype=torch.long))\n"
        "print(tuple(g.shape))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "DRLLM_NO_EXT"}
    env["DRLLM_OPS_BACKEND"] = "reference"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().endswith("(4, 3)")


def test_torch_compile_gather_scatter():
    def step(x, idx, src):
        return torch.ops.drllm.scatter_rows(x, idx, torch.ops.drllm.gather_rows(src, idx) * 2)

    x, src = torch.randn(5, 3), torch.randn(5, 3)
    idx = torch.tensor([0, 3])
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(x, idx, src), step(x, idx, src))


# ----------------------------------------------------------------------------- dispatch


def test_has_kernel_reports_the_loaded_kernels():
    assert all(ops.has_kernel(op, "cpu") for op in backends.EXT_OPS)
    assert not ops.has_kernel("gather_rows", "mps")  # a device type the extension never builds
    assert ops.backend("cpu")["ext"] == "loaded" and "cpu" in ops.backend("cpu")["ext_devices"]


def test_dispatch_uses_extension_on_cpu(monkeypatch):
    prev = ops.set_backend("auto")
    try:
        assert ops.backend("cpu")["rows"] == "ext"
        calls = []
        real = torch.ops.drllm.gather_rows

        class Spy:
            def __call__(self, *a):
                calls.append(a)
                return real(*a)

        monkeypatch.setattr(torch.ops.drllm, "gather_rows", Spy())
        x = torch.randn(4, 2)
        assert torch.equal(ops.gather_rows(x, torch.tensor([1])), x[1:2])
        assert len(calls) == 1
        # a tensor that needs gradients takes the (differentiable) reference
        y = torch.randn(4, 2, requires_grad=True)
        ops.gather_rows(y, torch.tensor([1])).sum().backward()
        assert len(calls) == 1 and y.grad is not None
        ops.set_backend("reference")
        assert ops.backend("cpu")["rows"] == "reference"
        ops.gather_rows(x, torch.tensor([1]))
        assert len(calls) == 1
    finally:
        ops.set_backend(prev)


def test_dispatch_public_functions_match_reference():
    gen = torch.Generator().manual_seed(1)
    d = torch.randint(0, 3, (16,), generator=gen)
    x = torch.randn(16, 7, 9, generator=gen)
    p1, p2 = ops.compact_rows(d)
    r1, r2 = ops.compact_rows_reference(d)
    assert torch.equal(p1, r1) and torch.equal(p2, r2)
    g = ops.gather_rows(x, p1)
    assert torch.equal(g, x[p1])
    s = ops.scatter_rows(x, p1, g + 1)
    assert torch.equal(s, x.index_copy(0, p1, g + 1))
    y = x.clone()
    out = ops.scatter_rows(y, p2, x[p2] - 1, inplace=True)
    assert out is y and torch.equal(y, x.index_copy(0, p2, x[p2] - 1))
