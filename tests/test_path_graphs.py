"""Whole-step graphs per path and path-grouped batching decode as eager decoding does; warm paths compile nothing.

Graphs are counted with dynamo's own compile counter around the backend, so
the checks are on what was really compiled. No timings here (see
``drllm bench --suites compile,throughput``).
"""

from __future__ import annotations

import gc
import threading
import weakref

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import drllm
from conftest import output_cache, random_batch, tiny_model
from drllm.runtime.cache import routed_cache
from drllm.runtime.grouping import plan_groups, restore_group_policy, set_group_policy
from drllm.runtime.state import require_state

A, B, C = [1, 0, 2, 1], [2, 1, 1, 0], [1, 1, 0, 1]


def decode(model, ids, mask, n=4, cache="static", **kwargs):
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                         pad_token_id=0, output_logits=True, return_dict_in_generate=True,
                         cache_implementation=cache, **kwargs)
    return out.sequences, torch.stack(out.logits, dim=1), routed_cache(output_cache(out))


@pytest.fixture(scope="module")
def models(one_thread):
    """An eager and a compiled (inductor) copy of one patched tiny Llama."""
    eager = drllm.patch(tiny_model("llama"))
    compiled = drllm.patch(tiny_model("llama"))
    drllm.compile(compiled, backend=CompileCounterWithBackend("inductor"))
    yield eager, compiled
    drllm.unpatch(compiled)


@torch.no_grad()
@pytest.mark.parametrize("paths", [[A], [A, B, A, B]], ids=["batch 1", "mixed paths"])
def test_path_graph_decoding_equals_eager(models, paths):
    eager, compiled = models
    ids, mask = random_batch(len(paths), 9, seed=len(paths))
    with drllm.forced_paths(eager, paths):
        want, want_logits, _ = decode(eager, ids, mask)
    with drllm.forced_paths(compiled, paths):
        got, logits, cache = decode(compiled, ids, mask)
    assert torch.equal(got, want)
    torch.testing.assert_close(logits, want_logits, rtol=1e-4, atol=1e-4)
    level = "model" if len(paths) == 1 else "decoder"  # one path: the whole model's graph; groups: the decoder's
    assert set(require_state(compiled).graphs.compile_seconds) >= {(tuple(p), level) for p in paths}, "graphs ran"
    if len(paths) > 1:
        assert [g.path for g in cache.groups] == [tuple(A), tuple(B)]


def budget_model(seed: int = 0):
    """A tiny Llama patched with budget routers of head ``sets``: a vocabulary of three paths at budget 1."""
    model = tiny_model("llama", seed=seed)
    routers = drllm.BudgetRouters("llama", 48, 4, tap=1, head="sets", sets={1: [[1], [2], [3]]})
    return drllm.patch(model, routers, budget=1), routers


@torch.no_grad()
def test_warm_vocabulary_paths_compile_nothing():
    model, routers = budget_model()
    counter = CompileCounterWithBackend("eager")
    drllm.compile(model, backend=counter)
    vocabulary = [[1, 1, 1, 1] for _ in routers.sets[1]]
    for path, (skip,) in zip(vocabulary, routers.sets[1]):
        path[skip] = 0
    previous = set_group_policy(min_rows=1)  # every path its own group: only path graphs decode
    try:
        # warm-up: each path at batch 1, then two batch sizes (a graph for every size), as the whole batch (the
        # model's graph) and as a group of a mixed batch (the decoder's graph)
        for rows in (1, 2, 3):
            for paths in [[path] * rows for path in vocabulary] + [[p for p in vocabulary for _ in range(rows)]]:
                ids, mask = random_batch(len(paths), 9, seed=rows)
                with drllm.forced_paths(model, paths):
                    decode(model, ids, mask)
        warm = counter.frame_count
        assert warm > 0
        picked = set()
        for rows, seed in ((1, 11), (6, 12), (5, 13)):  # the routers' own picks on new prompts
            ids, mask = random_batch(rows, 9, seed=seed)
            _, _, cache = decode(model, ids, mask)
            picked |= {tuple(p) for p in cache.decisions.tolist()}
        assert len(picked) >= 2, "the prompts should reach more than one vocabulary path"
        assert picked <= {tuple(p) for p in vocabulary}
        assert counter.frame_count == warm
    finally:
        restore_group_policy(previous)


@torch.no_grad()
@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_grouped_batching_equals_ungrouped(cache):
    model = drllm.patch(tiny_model("qwen3", seed=2))
    paths = [A, B, A, C, A, B]
    ids, mask = random_batch(len(paths), 9, seed=4)
    previous = set_group_policy(enabled=False)
    try:
        with drllm.forced_paths(model, paths):
            want, want_logits, plain = decode(model, ids, mask, n=5, cache=cache)
        set_group_policy(enabled=True, min_rows=2)
        with drllm.forced_paths(model, paths):
            got, logits, grouped = decode(model, ids, mask, n=5, cache=cache)
    finally:
        restore_group_policy(previous)
    assert plain.groups == []
    assert [g.path for g in grouped.groups] == [tuple(A), tuple(B), None]
    assert [g.rows.tolist() for g in grouped.groups] == [[0, 2, 4], [1, 5], [3]]
    assert torch.equal(got, want)
    torch.testing.assert_close(logits, want_logits, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_grouped_beam_search_equals_ungrouped():
    """Beams reorder the rows of each prompt: the groups map their own caches' rows."""
    model = drllm.patch(tiny_model("llama", seed=3))
    ids, mask = random_batch(3, 8, seed=6)
    kwargs = dict(max_new_tokens=5, num_beams=3, num_return_sequences=2, do_sample=False, pad_token_id=0)
    previous = set_group_policy(enabled=False)
    try:
        with drllm.forced_paths(model, [A, B, A]):
            want = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
        set_group_policy(enabled=True, min_rows=2)
        with drllm.forced_paths(model, [A, B, A]):
            got = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
    finally:
        restore_group_policy(previous)
    assert torch.equal(got, want)


@torch.no_grad()
@pytest.mark.parametrize("paths", [[A, A], [A, B]], ids=["one path: the model's graph", "groups: the decoder's"])
def test_compiled_beam_search_equals_eager(paths):
    """Beams on a static cache through path graphs: the whole model's for a batch on one path (the head inside),
    the decoder's per group; tokens and the paths returned as eager decoding gives them."""
    eager = drllm.patch(tiny_model("llama", seed=7))
    compiled = drllm.compile(drllm.patch(tiny_model("llama", seed=7)), backend="eager")
    ids, mask = random_batch(2, 8, seed=8)
    kwargs = dict(max_new_tokens=4, num_beams=2, num_return_sequences=2, do_sample=False, pad_token_id=0,
                  cache_implementation="static", return_dict_in_generate=True)
    previous = set_group_policy(min_rows=1)
    try:
        with drllm.forced_paths(eager, paths):
            want = eager.generate(input_ids=ids, attention_mask=mask, **kwargs)
        with drllm.forced_paths(compiled, paths):
            got = compiled.generate(input_ids=ids, attention_mask=mask, **kwargs)
    finally:
        restore_group_policy(previous)
    assert torch.equal(got.sequences, want.sequences)
    assert torch.equal(got.paths, want.paths) and got.paths.tolist() == [paths[0]] * 2 + [paths[1]] * 2
    level = "model" if paths[0] == paths[1] else "decoder"
    assert {(tuple(p), level) for p in paths} <= set(require_state(compiled).graphs.compile_seconds)


def test_plan_groups_keeps_frequent_paths_and_pools_the_rest():
    decisions = torch.tensor([A, B, A, C, A, B])
    groups = plan_groups(decisions, min_rows=3)
    assert [(rows.tolist(), path) for rows, path in groups] == [([0, 2, 4], tuple(A)), ([1, 3, 5], None)]
    assert plan_groups(decisions, min_rows=4) == []  # no path is frequent enough: one batch
    assert plan_groups(torch.tensor([A, A]), min_rows=1) == []  # one path: one batch


@torch.no_grad()
def test_evicted_path_graphs_are_freed():
    """An LRU of one path: decoding a second path evicts the first, and its compiled graph goes with it."""
    built = weakref.WeakSet()

    def backend(gm, example_inputs):
        built.add(gm)
        return gm.forward

    model = drllm.patch(tiny_model("llama", seed=5))
    drllm.compile(model, path_graphs=1, backend=backend)
    ids, mask = random_batch(1, 6, seed=1)
    with drllm.forced_paths(model, [A]):
        decode(model, ids, mask, n=2)
    gc.collect()
    first = set(built)
    assert first and list(require_state(model).graphs.graphs) == [(tuple(A), "model")]
    with drllm.forced_paths(model, [B]):
        decode(model, ids, mask, n=2)
    assert list(require_state(model).graphs.graphs) == [(tuple(B), "model")]
    del first
    gc.collect()
    assert len(built) == 1, "only the graph of the path kept in the LRU is alive"


@torch.no_grad()
def test_path_graph_evicted_while_running_is_released_by_its_last_user():
    """An LRU of one path: a thread runs path A's graph while the main thread decodes path B, evicting A. A's graph
    must stay whole until that run ends (released under it, the run would recompile onto a code object no LRU
    holds), decode as eager decoding does, and go then."""
    timeout = 120  # seconds; every wait is bounded so a bug fails instead of hanging
    entered, resume = threading.Event(), threading.Event()
    built = weakref.WeakSet()

    def backend(gm, example_inputs):
        built.add(gm)

        def run(*args):  # the worker's first call of its graph (path A's) waits inside the graph for the main thread
            if threading.current_thread() is worker and not entered.is_set():
                entered.set()
                if not resume.wait(timeout):
                    raise TimeoutError("the main thread never resumed the worker")
            return gm.forward(*args)
        return run

    eager = drllm.patch(tiny_model("llama", seed=5))
    model = drllm.patch(tiny_model("llama", seed=5))
    drllm.compile(model, path_graphs=1, backend=backend)
    graphs = require_state(model).graphs
    ids, mask = random_batch(1, 6, seed=1)
    with drllm.forced_paths(eager, [A]):
        want, want_logits, _ = decode(eager, ids, mask, n=2)
    result = {}

    def decode_a():
        try:
            with torch.no_grad(), drllm.forced_paths(model, [A]):
                result["out"] = decode(model, ids, mask, n=2)  # one decode step: one call of A's graph
        except BaseException as error:  # noqa: BLE001 -- reported by the main thread
            result["error"] = error
        finally:
            entered.set()

    worker = threading.Thread(target=decode_a, daemon=True)
    worker.start()
    try:
        assert entered.wait(timeout), "the worker never reached A's graph"
        assert "error" not in result, result.get("error")
        with graphs.lock:
            running = graphs.graphs[(tuple(A), "model")]
        code = running.function.__code__
        with drllm.forced_paths(model, [B]):
            decode(model, ids, mask, n=2)
        assert list(graphs.graphs) == [(tuple(B), "model")], "B evicted A"
        assert running.evicted and running.users == 1
        assert torch._dynamo.eval_frame._debug_get_cache_entry_list(code), "A's graph was released under its run"
        gc.collect()
        assert len(built) == 2
    finally:
        resume.set()
        worker.join(timeout)
    assert not worker.is_alive(), "the worker did not finish"
    assert "error" not in result, result.get("error")
    got, logits, _ = result["out"]
    assert torch.equal(got, want)
    torch.testing.assert_close(logits, want_logits, rtol=1e-5, atol=1e-5)
    assert running.users == 0
    assert not torch._dynamo.eval_frame._debug_get_cache_entry_list(code), "A's last user released its graph"
    assert list(graphs.graphs) == [(tuple(B), "model")]
    del running
    gc.collect()
    assert len(built) == 1, "only the graph of the path kept in the LRU is alive"


@torch.no_grad()
def test_routed_static_cache_decodes_as_vanilla_static_cache():
    """An unpadded prompt (no attention mask reaches the decode steps): the routed cache of static slots must
    still mask the slots' unfilled positions, as transformers' static cache does."""
    model = tiny_model("llama", seed=7)
    ids = torch.randint(1, 97, (1, 8), generator=torch.Generator().manual_seed(7))
    mask = torch.ones_like(ids)
    want, want_logits, _ = decode(model, ids, mask, n=4)
    drllm.patch(model)
    got, logits, _ = decode(model, ids, mask, n=4)
    assert torch.equal(got, want)
    torch.testing.assert_close(logits, want_logits, rtol=1e-6, atol=1e-6)
