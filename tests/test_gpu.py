"""The routed runtime end to end on a GPU: fused kernels, CUDA row ops, compiled decoding with CUDA graphs.

Skipped without CUDA (``benchmarks/gpu_check.sh`` runs them on a GPU machine).
``DRLLM_GPU_TEST_DEVICE=cpu`` runs the same checks on the CPU, to keep the
file honest on machines without a GPU.
"""

from __future__ import annotations

import os

import pytest
import torch

import drllm
from conftest import random_batch, tiny_model
from test_runtime import explicit_logits, generate, random_paths
from test_runtime_modes import confident_routers

DEVICE = torch.device(os.environ.get("DRLLM_GPU_TEST_DEVICE", "cuda"))
pytestmark = pytest.mark.skipif(DEVICE.type == "cuda" and not torch.cuda.is_available(), reason="needs a GPU")
L = 4


def on_device(family: str = "llama", dtype=torch.float32, seed: int = 0):
    """The same tiny model twice: on the CPU in fp32 (the reference) and on the device in ``dtype``."""
    reference = tiny_model(family, seed=seed)
    model = tiny_model(family, seed=seed).to(DEVICE, dtype)
    return reference, model


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forced_paths_on_the_device_match_the_cpu_layer_loop(dtype):
    """Flash-attention's rule: against an fp64 layer loop, the device errs at most 2x the dtype's own CPU loop."""
    _, model = on_device(dtype=dtype)
    exact_model = tiny_model("llama").double()
    plain = tiny_model("llama").to(dtype)  # the dtype's own error, on the CPU
    ids, mask = random_batch(5, 12, seed=1)
    paths = random_paths(5, seed=2)
    with drllm.forced_paths(model, paths):
        out = model(input_ids=ids.to(DEVICE), attention_mask=mask.to(DEVICE)).logits.float().cpu()
    for row in range(5):
        real = mask[row].bool()
        exact = explicit_logits(exact_model, ids[row, real], paths[row])
        err = (out[row, real].double() - exact).abs().max().item()
        err_plain = (explicit_logits(plain, ids[row, real], paths[row]).double() - exact).abs().max().item()
        tolerance = 2 * err_plain if dtype != torch.float32 else 1e-4
        assert err <= tolerance + 1e-6, (row, err, err_plain)


@torch.no_grad()
def test_routed_generation_on_the_device_equals_the_cpu():
    """Fused pooling and device row ops route and generate as the CPU reference does (fp32)."""
    reference, model = on_device()
    drllm.patch(reference, confident_routers(reference))
    drllm.patch(model, confident_routers(reference).to(DEVICE))
    ids, mask = random_batch(4, 12, seed=3)
    want = generate(reference, ids, mask, n=6)
    want_paths = drllm.last_paths(reference)
    for cache in (None, "static"):
        got = generate(model, ids.to(DEVICE), mask.to(DEVICE), n=6, cache_implementation=cache)
        assert torch.equal(drllm.last_paths(model), want_paths)
        assert torch.equal(got[0].cpu(), want[0])
        torch.testing.assert_close(got[1].cpu(), want[1], rtol=1e-3, atol=1e-3)


@torch.no_grad()
def test_compiled_decoding_on_the_device_equals_eager_and_compiles_once():
    from torch._dynamo.utils import counters

    _, eager = on_device(seed=5)
    _, compiled = on_device(seed=5)
    routers = confident_routers(eager, seed=5)
    drllm.patch(eager, routers)
    drllm.patch(compiled, routers)
    drllm.compile(compiled, **({"mode": "reduce-overhead"} if DEVICE.type == "cuda" else {}))
    ids, mask = random_batch(3, 10, seed=6)
    ids, mask = ids.to(DEVICE), mask.to(DEVICE)
    for paths in (None, random_paths(3, seed=7)):
        for cache in ("static", None):
            with drllm.forced_paths(eager, paths) if paths is not None else torch.no_grad():
                want = generate(eager, ids, mask, n=6, cache_implementation=cache)
            with drllm.forced_paths(compiled, paths) if paths is not None else torch.no_grad():
                got = generate(compiled, ids, mask, n=6, cache_implementation=cache)
            assert torch.equal(got[0], want[0])
            torch.testing.assert_close(got[1], want[1], rtol=1e-3, atol=1e-3)
    graphs = counters["stats"]["unique_graphs"]
    with drllm.forced_paths(compiled, random_paths(3, seed=8)):
        generate(compiled, ids, mask, n=6, cache_implementation="static")
    assert counters["stats"]["unique_graphs"] == graphs, "a new path compiles nothing"
