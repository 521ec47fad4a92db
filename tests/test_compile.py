"""Compiled routed decoding equals eager decoding, and new paths compile nothing but their whole-step graph.

``drllm.compile`` compiles the block class's forward once for every block,
pass and path (regional compilation; the routing stays eager between the
compiled blocks), and a static-cache decode step on one path as one graph
of that path (tests/test_path_graphs.py). Graphs are counted with dynamo's own compile counter around
inductor, so the check is on what was really compiled.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import drllm
from conftest import random_batch, tiny_model
from drllm.runtime.state import require_state
from test_runtime import generate
from test_runtime_modes import confident_routers


@pytest.fixture(scope="module")
def models():
    """An eager and a compiled copy of one patched tiny Llama with confident routers."""
    eager = tiny_model("llama")
    drllm.patch(eager, confident_routers(eager))
    compiled = tiny_model("llama")
    drllm.patch(compiled, confident_routers(compiled))
    counter = CompileCounterWithBackend("inductor")
    drllm.compile(compiled, backend=counter)
    yield eager, compiled, counter
    drllm.unpatch(compiled)


CASES = {
    "routers, left-padded batch": dict(batch=4, seed=3, paths=None),
    "routers, batch 1": dict(batch=1, seed=5, paths=None),
    "forced mixed paths": dict(batch=3, seed=1, paths=[[1, 0, 2, 1], [1, 1, 1, 1], [2, 1, 0, 0]]),
    "forced path, batch 1": dict(batch=1, seed=2, paths=[[0, 2, 1, 1]]),
}


def _generate(model, case, cache):
    ids, mask = random_batch(case["batch"], 9, seed=case["seed"])
    kwargs = dict(cache_implementation=cache, n=5)
    if case["paths"] is None:
        out = generate(model, ids, mask, **kwargs)
    else:
        with drllm.forced_paths(model, case["paths"]):
            out = generate(model, ids, mask, **kwargs)
    return out, drllm.last_paths(model)


@torch.no_grad()
@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("case", list(CASES))
def test_compiled_generation_equals_eager(models, case, cache):
    eager, compiled, _ = models
    (seq, logits), paths = _generate(eager, CASES[case], cache)
    (cseq, clogits), cpaths = _generate(compiled, CASES[case], cache)
    assert torch.equal(cpaths, paths)
    assert torch.equal(cseq, seq)
    torch.testing.assert_close(clogits, logits, rtol=1e-4, atol=1e-4)


@torch.no_grad()
@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_a_new_path_compiles_nothing_but_its_graph(models, cache):
    """Regional blocks serve every path (a dynamic cache compiles nothing for a new path); on a static cache a new
    path compiles its whole-step graph and nothing else."""
    _, compiled, counter = models
    ids, mask = random_batch(1, 9, seed=8)
    with drllm.forced_paths(compiled, [[1, 1, 1, 1]]):
        generate(compiled, ids, mask, n=4, cache_implementation=cache)
    graphs = counter.frame_count
    assert graphs > 0, "decode steps ran compiled code"
    seen = set()
    for path in ([0, 1, 2, 1], [2, 2, 0, 1], [1, 0, 1, 2], [2, 1, 1, 0]):
        with drllm.forced_paths(compiled, [path]):
            generate(compiled, ids, mask, n=4, cache_implementation=cache)
        seen.add(tuple(drllm.last_paths(compiled)[0].tolist()))
    assert len(seen) == 4
    assert counter.frame_count == graphs + (4 if cache == "static" else 0)
    if cache == "static":
        assert {(path, "model") for path in seen} <= set(require_state(compiled).graphs.compile_seconds)


@torch.no_grad()
def test_compiling_the_whole_model_forward_works():
    """The issue's reproducer: ``m.forward = torch.compile(m.forward)`` then a static-cache generate."""
    model = tiny_model("qwen3", seed=4)
    routers = confident_routers(model, seed=4)
    ids, mask = random_batch(3, 8, seed=4)
    drllm.patch(model, routers)
    want, want_paths = generate(model, ids, mask, n=4, cache_implementation="static"), drllm.last_paths(model)
    model.forward = torch.compile(model.forward, backend="eager")
    got = generate(model, ids, mask, n=4, cache_implementation="static")
    assert torch.equal(drllm.last_paths(model), want_paths)
    assert torch.equal(got[0], want[0])
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-5)


def test_compile_refuses_hooked_blocks_and_unpatched_models():
    model = tiny_model("llama")
    with pytest.raises(RuntimeError, match="not patched"):
        drllm.compile(model)
    layer = model.model.layers[2]
    layer.forward = layer.forward  # an instance forward, as accelerate's hooks set
    drllm.patch(model)
    with pytest.raises(ValueError, match=r"blocks \[2\]"):
        drllm.compile(model)
