"""Benchmarks of the hot-path ops (pytest-benchmark).

    python -m pytest benchmarks/bench_ops.py --benchmark-only \
        --benchmark-columns=min,median,mean,stddev,rounds --benchmark-sort=name

- pooling: windowed mean pooling + router MLP for every block of a model
  (30 blocks, H = 576, the shape of SmolLM2-135M), batch of left-padded
  prompts: the reference (``ops.pooled_router_logits_reference``), a
  per-window Python loop, the dispatcher (``ops.pooled_router_logits``: the
  reference on CPU, Triton on CUDA) and, on CUDA, the Triton kernel itself.
- rows: compaction, gather and scatter of hidden states ``[B, T, H]`` through
  the extension (``torch.ops.drllm.*``) against ``nonzero`` / ``index_select`` /
  ``index_copy``. ``extra_info`` holds the achieved bandwidth (GB/s, bytes read
  plus written); on CUDA a device-to-device copy of the same bytes is measured
  in the same run as the ceiling.

On CUDA each timed call runs ``INNER`` iterations and then synchronises;
``extra_info['us_per_op']`` divides it back.
"""

from __future__ import annotations

import pytest
import torch

from drllm import ops
from drllm.ops import backends

CUDA = torch.cuda.is_available()
DEVICES = ["cpu"] + (["cuda"] if CUDA else [])
INNER = {"cpu": 1, "cuda": 20}

L, H, NW = 30, 576, 8  # blocks, hidden size, windows
B, T = 8, 150  # batch, padded prompt length

HAS_EXT = backends.load_ext()  # the "ext" cases call torch.ops.drllm.* directly, whatever the backend mode
HAS_TRITON = backends.kernels is not None and backends.kernels.HAS_TRITON


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def _timed(benchmark, device, fn, bytes_moved=None, ops_per_call=1):
    """Benchmark ``fn`` (run INNER times per call on CUDA) and record per-op time and GB/s."""
    inner = INNER[device]

    def call():
        for _ in range(inner):
            out = fn()
        _sync(device)
        return out

    call()  # warm-up (compilation, allocator)
    result = benchmark(call)
    median = benchmark.stats.stats.median / inner
    benchmark.extra_info["device"] = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    benchmark.extra_info["us_per_op"] = round(median / ops_per_call * 1e6, 2)
    if bytes_moved is not None:
        benchmark.extra_info["GB/s"] = round(bytes_moved / median / 1e9, 2)
    return result


# ----------------------------------------------------------------------------- pooling + router


def _pooling_inputs(device, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(40, T + 1, (B,), generator=gen)
    lengths[0] = T
    mask = (torch.arange(T)[None, :] >= T - lengths[:, None]).long()  # left padding
    hidden = [torch.randn(B, T, H, generator=gen).to(dtype).to(device) for _ in range(L)]
    params = []
    for _ in range(L):
        w1 = torch.nn.init.xavier_uniform_(torch.empty(128, H), generator=gen)
        w2 = torch.nn.init.xavier_uniform_(torch.empty(3, 128), generator=gen)
        params.append(tuple(t.to(device) for t in (w1, torch.zeros(128), w2, torch.zeros(3))))
    return hidden, mask.to(device), params


POOLING = {
    "reference": ops.pooled_router_logits_reference,
    "loop": ops.pooled_router_logits_loop,
    "dispatch": ops.pooled_router_logits,
}


def _pooling_cases():
    cases = []
    for device in DEVICES:
        dtypes = [torch.float32] + ([torch.bfloat16] if device == "cuda" else [])
        for dtype in dtypes:
            impls = list(POOLING) + (["triton"] if device == "cuda" and HAS_TRITON else [])
            cases += [pytest.param(device, dtype, impl, id=f"{device}-{str(dtype)[6:]}-{impl}") for impl in impls]
    return cases


@pytest.mark.parametrize("device,dtype,impl", _pooling_cases())
def test_pooling_all_blocks(benchmark, device, dtype, impl):
    benchmark.group = f"pooling+router {L} blocks B={B} T={T} H={H} {device} {str(dtype)[6:]}"
    hidden, mask, params = _pooling_inputs(device, dtype)
    if impl == "triton":
        fn1 = backends.kernels.pooled_router_logits_triton
    else:
        fn1 = POOLING[impl]

    def all_blocks():
        with torch.no_grad():
            return [fn1(hidden[i], mask, NW, *params[i]) for i in range(L)]

    out = _timed(benchmark, device, all_blocks, bytes_moved=sum(h.numel() * h.element_size() for h in hidden), ops_per_call=L)
    ref = [ops.pooled_router_logits_reference(hidden[i], mask, NW, *params[i]) for i in range(L)]
    torch.testing.assert_close(torch.stack(out), torch.stack(ref), rtol=1e-4, atol=5e-5)
    benchmark.extra_info["backend"] = ops.backend(device)["pooling"] if impl == "dispatch" else impl


# ----------------------------------------------------------------------------- row ops

ROW_B, ROW_T = 16, 150


def _rows_inputs(device, dtype, frac):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(ROW_B, ROW_T, H, generator=gen).to(dtype).to(device)
    n = max(1, int(ROW_B * frac))
    idx = torch.randperm(ROW_B, generator=gen)[:n].sort().values.to(device)
    return x, idx


def _row_cases():
    out = []
    for device in DEVICES:
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        for frac in (0.5, 1.0):
            out.append(pytest.param(device, dtype, frac, id=f"{device}-{str(dtype)[6:]}-{int(frac * 100)}pct"))
    return out


def _rows_impls(device):
    impls = ["torch"]
    if HAS_EXT and ops.has_kernel("gather_rows", device):
        impls.append("ext")
    if device == "cuda":
        impls.append("d2d_copy")
    return impls


@pytest.mark.parametrize("impl", ["torch", "ext", "d2d_copy"])
@pytest.mark.parametrize("device,dtype,frac", _row_cases())
def test_gather_rows(benchmark, device, dtype, frac, impl):
    if impl not in _rows_impls(device):
        pytest.skip(f"{impl} not available on {device}")
    benchmark.group = f"gather rows [{ROW_B},{ROW_T},{H}] {int(frac * 100)}% {device} {str(dtype)[6:]}"
    x, idx = _rows_inputs(device, dtype, frac)
    n_bytes = 2 * idx.numel() * x[0].numel() * x.element_size()
    if impl == "torch":
        fn = lambda: x.index_select(0, idx)  # noqa: E731
    elif impl == "ext":
        fn = lambda: torch.ops.drllm.gather_rows(x, idx)  # noqa: E731
    else:  # the same bytes, one contiguous device-to-device copy: the bandwidth ceiling
        dst = torch.empty_like(x[: idx.numel()])
        fn = lambda: dst.copy_(x[: idx.numel()])  # noqa: E731
    out = _timed(benchmark, device, fn, bytes_moved=n_bytes)
    if impl != "d2d_copy":
        assert torch.equal(out, x.index_select(0, idx))


@pytest.mark.parametrize("impl", ["torch", "ext", "torch_inplace", "ext_inplace", "d2d_copy"])
@pytest.mark.parametrize("device,dtype,frac", _row_cases())
def test_scatter_rows(benchmark, device, dtype, frac, impl):
    avail = _rows_impls(device)
    if impl.removesuffix("_inplace") not in avail:
        pytest.skip(f"{impl} not available on {device}")
    benchmark.group = f"scatter rows [{ROW_B},{ROW_T},{H}] {int(frac * 100)}% {device} {str(dtype)[6:]}"
    base, idx = _rows_inputs(device, dtype, frac)
    src = torch.randn(idx.numel(), ROW_T, H).to(dtype).to(device)
    row_bytes = base[0].numel() * base.element_size()
    if impl.endswith("_inplace"):
        n_bytes = 2 * idx.numel() * row_bytes
    else:  # read base + write the copy, then src rows on top (the ext's CPU kernel writes each row once)
        n_bytes = 2 * ROW_B * row_bytes
    target = base.clone()
    fns = {
        "torch": lambda: base.index_copy(0, idx, src),
        "ext": lambda: torch.ops.drllm.scatter_rows(base, idx, src),
        "torch_inplace": lambda: target.index_copy_(0, idx, src),
        "ext_inplace": lambda: torch.ops.drllm.scatter_rows_(target, idx, src),
        "d2d_copy": lambda: target.copy_(base),
    }
    out = _timed(benchmark, device, fns[impl], bytes_moved=n_bytes)
    if impl in ("torch", "ext"):
        assert torch.equal(out, base.index_copy(0, idx, src))


@pytest.mark.parametrize("impl", ["torch", "ext"])
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n", [16, 4096])
def test_compact_rows(benchmark, device, impl, n):
    if impl not in _rows_impls(device):
        pytest.skip(f"{impl} not available on {device}")
    benchmark.group = f"compact rows B={n} {device}"
    d = torch.randint(0, 3, (n,), generator=torch.Generator().manual_seed(n)).to(device)
    fn = (lambda: ops.compact_rows_reference(d)) if impl == "torch" else (lambda: torch.ops.drllm.compact_rows(d))
    p1, p2 = _timed(benchmark, device, fn)
    r1, r2 = ops.compact_rows_reference(d)
    assert torch.equal(p1, r1) and torch.equal(p2, r2)
