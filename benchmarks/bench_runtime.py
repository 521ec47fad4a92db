"""pytest-benchmark suites of the routed runtime, each next to its vanilla baseline.

The same comparisons as ``drllm bench`` (drllm/bench/): routing overhead
against a prefill, batch-1 generation on fixed paths against vanilla,
throughput with paper-statistics paths against vanilla, and gather/scatter
against run-all-and-select. Each benchmark's ``extra_info`` records its
group's baseline so ratios can be read from ``--benchmark-json``; compare
within a group (``--benchmark-group-by=group``). pytest-benchmark runs the
variants one after the other, not interleaved: on a loaded machine prefer
``drllm bench``, whose ratios come from interleaved repeats.

Not collected by the normal test run (pyproject ``testpaths = ["tests"]``)::

    pytest benchmarks/bench_runtime.py --benchmark-only --benchmark-group-by=group

Small sizes by default (a tiny random Llama and the embedded model at short
lengths); ``DRLLM_BENCH_FULL=1`` uses the issue's sizes (T up to 2048, 256 and
1,000 new tokens, batch up to 64 on the CPU and 128 on CUDA), and
``DRLLM_BENCH_THREADS`` the CPU threads (default 1), and
``DRLLM_BENCH_MODEL`` picks the model (``embedded``, or ``random:<config>``
with a config of ``drllm.bench.config.RANDOM_CONFIGS``, e.g. ``random:llama-3.1-8b``
on a GPU).
"""

from __future__ import annotations

import contextlib
import os

import pytest
import torch

import drllm
from drllm.bench.config import random_model
from drllm.bench.policy import policy_paths
from drllm.bench.routing import execute_routers
from drllm.bench.workload import (evenly_skipped_path, generate_exactly, path_statistics, random_tokens, routed,
                                  sample_paths, union_passes)
from drllm.routing.decide import choose
from drllm.routing.pooling import Pooling
from drllm.runtime.plan import restore_row_policy, set_row_policy

FULL = os.environ.get("DRLLM_BENCH_FULL", "").strip() not in ("", "0")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
MODEL = os.environ.get("DRLLM_BENCH_MODEL", "embedded" if FULL else "random:tiny")

PREFILL = (128, 512, 2048) if FULL else (128, 512)
NEW_TOKENS = (256, 1000) if FULL else (16,)
SKIPS = (0, 3, 5, 8)
BATCHES = ((1, 2, 4, 8, 16, 32, 64, 128) if DEVICE.type == "cuda" else (1, 2, 4, 8, 16, 32, 64)) if FULL else (1, 4, 16)
THROUGHPUT_TOKENS = 32 if FULL else 8
POLICY = [(b, f) for b in ((8, 64) if FULL else (8,)) for f in ((0.25, 0.5, 0.75, 0.9) if FULL else (0.5, 0.9))]


def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def _pedantic(benchmark, fn, rounds=3, group=None, **info):
    """Benchmark ``fn`` (CUDA synchronised) with one warm-up round."""
    if group:
        benchmark.group = group
    benchmark.extra_info.update(info)

    def run():
        fn()
        _sync()

    benchmark.pedantic(run, rounds=rounds, iterations=1, warmup_rounds=1)


@pytest.fixture(scope="module")
def model():
    if DEVICE.type == "cpu":  # one thread keeps timings steady on a shared machine (DRLLM_BENCH_THREADS=0: torch's)
        threads = int(os.environ.get("DRLLM_BENCH_THREADS", "1"))
        if threads:
            torch.set_num_threads(threads)
    if MODEL.startswith("random:"):
        m = random_model(MODEL[len("random:"):], device=DEVICE)
    else:
        from drllm.models import load_model

        m = load_model(device=DEVICE)[0]
    yield m
    if drllm.is_patched(m):
        drllm.unpatch(m)


@contextlib.contextmanager
def variant(model, name, paths=None):
    """``vanilla``: the unpatched model; otherwise patched, on ``paths`` when given."""
    if name == "vanilla":
        yield model
        return
    with routed(model, paths):
        yield model


def generate(model, ids, n):
    return generate_exactly(model, ids, n)


# --------------------------------------------------------------------------- 1. routing overhead


@pytest.mark.parametrize("T", PREFILL)
@pytest.mark.parametrize("what", ["vanilla-prefill", "routers-all-blocks", "routed-prefill"])
def test_routing_overhead(benchmark, model, T, what):
    ids = random_tokens(model, 1, T, T)
    L, H = model.config.num_hidden_layers, model.config.hidden_size
    routers = execute_routers(model)
    if what == "routers-all-blocks":
        hidden = torch.randn(1, T, H, device=DEVICE, dtype=model.dtype)
        mask = torch.ones(1, T, dtype=torch.long, device=DEVICE)

        def fn():
            pooling = Pooling(routers, mask)
            for i in range(L):
                choose(pooling.logits(i, hidden), 0.0)
    else:
        def fn():
            model(input_ids=ids, use_cache=True)

    ctx = routed(model, routers=routers) if what == "routed-prefill" else contextlib.nullcontext()
    with torch.no_grad(), ctx:
        _pedantic(benchmark, fn, group=f"routing T={T}", baseline="vanilla-prefill", T=T, variant=what)


# --------------------------------------------------------------------------- 2. generation latency


@pytest.mark.parametrize("n", NEW_TOKENS)
@pytest.mark.parametrize("path", ["vanilla", "all-execute", "skip-3", "skip-5", "skip-8", "all-skip"])
def test_generation_latency(benchmark, model, n, path):
    L = model.config.num_hidden_layers
    ids = random_tokens(model, 1, 32, 0)
    paths = None
    if path.startswith("skip-"):
        k = int(path.split("-")[1])
        if k >= L:
            pytest.skip(f"the model has {L} blocks")
        paths = evenly_skipped_path(L, k)
    elif path == "all-skip":  # the fixed cost: embeddings, norm, head, the generate loop
        paths = torch.zeros(L, dtype=torch.int64)
    with variant(model, path, paths):
        _pedantic(benchmark, lambda: generate(model, ids, n), group=f"generation {n} tokens",
                  baseline="vanilla", fixed_cost="all-skip", blocks=L if paths is None else int(paths.sum()))


# --------------------------------------------------------------------------- 3. throughput


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("what", ["vanilla", "routed", "all-skip"])
def test_throughput(benchmark, model, batch, what):
    L = model.config.num_hidden_layers
    ids = random_tokens(model, batch, 16, batch)
    paths = sample_paths(batch, L, generator=torch.Generator().manual_seed(batch))
    if what == "all-skip":
        paths = torch.zeros(L, dtype=torch.int64)
    with variant(model, what, paths):
        _pedantic(benchmark, lambda: generate(model, ids, THROUGHPUT_TOKENS), group=f"throughput batch={batch}",
                  baseline="vanilla", tokens=batch * THROUGHPUT_TOKENS, union_passes=union_passes(paths),
                  num_blocks=L, **path_statistics(paths))


# --------------------------------------------------------------------------- 4. gather vs select


@pytest.mark.parametrize("batch, fraction", POLICY)
@pytest.mark.parametrize("policy", ["gather", "select"])
def test_gather_vs_select(benchmark, model, batch, fraction, policy):
    L = model.config.num_hidden_layers
    ids = random_tokens(model, batch, 16, batch)
    paths = policy_paths(batch, L, fraction)
    previous = set_row_policy(policy)
    try:
        with variant(model, "routed", paths):
            _pedantic(benchmark, lambda: generate(model, ids, THROUGHPUT_TOKENS),
                      group=f"policy batch={batch} active={fraction}", baseline="gather", policy=policy)
    finally:
        restore_row_policy(previous)
