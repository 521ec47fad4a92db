"""`drllm bench` end to end on a tiny model, path sampling, and the executor's row policy.

No timing is asserted here: timings live in benchmarks/ and `drllm bench`.
"""

from __future__ import annotations

import json

import pytest
import torch

import drllm
from conftest import output_cache, random_batch, tiny_model
from drllm.bench import run as run_bench
from drllm.bench import workload
from drllm.bench.config import BenchConfig, random_model
from drllm.bench.policy import crossover, policy_paths
from drllm.routing.pooling import Pooling
from drllm.runtime import executor, plan
from drllm.runtime.plan import Rows

L = 4


def test_bench_command_end_to_end_writes_json(tmp_path, capsys, monkeypatch):
    from drllm.cli import main

    threads = torch.get_num_threads()
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # the command pins threads; keep the session's

    out = tmp_path / "bench.json"
    argv = ["bench", "--quick", "--model", "random:tiny", "--json", str(out), "--prefill-lengths", "16,32",
            "--suites", "routing,generation,policy",
            "--gen-tokens", "2,3", "--batch-sizes", "1,3", "--policy-batches", "4", "--tokens", "2"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    for title in ("routing overhead", "generation latency", "gather/scatter"):
        assert title in printed
    data = json.loads(out.read_text())
    info = data["info"]
    assert info["model"] == "random:tiny" and info["num_blocks"] == 8 and info["quick"] is True
    suites = data["suites"]
    assert set(suites) == {"routing", "generation", "policy"}
    assert [r["T"] for r in suites["routing"]] == [16, 32]
    assert {(r["new_tokens"], r["variant"]) for r in suites["generation"]} == {
        (n, v) for n in (2, 3) for v in ("all-execute", "skip 3", "skip 5")
    }
    for r in suites["generation"]:
        assert r["blocks"] == 8 - r["skipped"] and 0 < r["ideal_ratio"] <= 1 and r["ratio"] > 0
        assert r["fixed_ms"] > 0 and r["vanilla_ms"] > 0
    assert {(r["batch"], r["active_fraction"]) for r in suites["policy"]} == {(4, 0.5), (4, 0.75)}
    assert set(data["policy_crossover"]) == {"4"}
    assert plan.row_policy()["policy"] == "auto", "the bench restores the row policy"
    _check_targets(data, {"routing_overhead_T32", "all_execute_vs_vanilla_eager", "fixed_path_share_of_ideal_eager"})


@pytest.fixture(scope="module")
def tokenizer_dir(tok, tmp_path_factory):
    """The tiny tokenizer saved where ``BenchConfig.tokenizer`` can load it."""
    path = tmp_path_factory.mktemp("tokenizer")
    tok.save_pretrained(path)
    return str(path)


def test_prompt_batches_are_left_padded_task_questions_or_random_tokens(tok, tokenizer_dir):
    from drllm.tasks.data import load_task

    model = random_model("tiny")
    cfg = BenchConfig(tokenizer=tokenizer_dir, task="arc_easy")
    ids, mask = workload.prompt_batch(model, cfg, 5, seed=3)
    assert ids.shape == mask.shape and ids.shape[0] == 5
    assert mask[:, -1].all() and not mask.all(), "left padding: every row ends on a token, some rows are shorter"
    questions = {f"Question: {e.question}\nAnswer:" for e in load_task("arc_easy")}
    texts = [tok.decode(row[m.bool()]) for row, m in zip(ids, mask)]
    assert all(text in questions for text in texts) and len(set(texts)) == 5
    assert torch.equal(workload.prompt_batch(model, cfg, 5, seed=3)[0], ids), "a seed gives the same batch"
    assert not torch.equal(workload.prompt_batch(model, cfg, 5, seed=4)[0], ids)
    ids, mask = workload.prompt_batch(model, BenchConfig(prompt_length=7), 3, seed=0)
    assert ids.shape == (3, 7) and mask.all() and (ids > 0).all()


def test_bench_throughput_and_grouping_suites(tokenizer_dir):
    """Throughput on the budget routers' paths (eager and compiled, dynamo's eager backend here; the prompts left
    padded task questions) and the grouping crossover, with their targets."""
    model = random_model("tiny")
    cfg = BenchConfig(suites=("throughput", "grouping"), repeats=1, batch_sizes=(1, 5), throughput_tokens=3,
                      prompt_length=6, policy_tokens=2, grouping_batch=4, grouping_rows=(1, 2), warmup=False,
                      compile_backend="eager", tokenizer=tokenizer_dir)
    data = run_bench(model, cfg, log=lambda *a: None)
    rows = data["suites"]["throughput"]
    assert [(r["batch"], r["mode"]) for r in rows] == [(1, "eager"), (1, "compiled"), (5, "eager"), (5, "compiled")]
    for r in rows:
        assert r["vanilla_tok_s"] > 0 and r["routed_tok_s"] > 0 and r["bound_tok_s"] > 0 and r["share_of_bound"] > 0
        assert r["mean_path_length"] == 8 - r["budget"] and 1 <= r["union_passes"] <= 8
    assert [(r["batch"], r["rows"]) for r in data["suites"]["grouping"]] == [(4, 1), (4, 2)]
    assert data["grouping_crossover_rows"] in (None, 1, 2)
    _check_targets(data, {f"throughput_B{b}_{m}_share_of_bound" for b in (1, 5) for m in ("eager", "compiled")}
                   | {"throughput_graphs_after_warmup"})


def _check_targets(data: dict, names: set) -> None:
    """Every target states its value, goal and comparison, and `met` is that comparison."""
    targets = data["targets"]
    assert set(targets) == names
    for t in targets.values():
        assert t["op"] in ("<=", ">=") and t["what"]
        assert t["met"] == (t["value"] <= t["target"] if t["op"] == "<=" else t["value"] >= t["target"])


def test_bench_compile_and_kernels_suites():
    """Suites compile and kernels at quick sizes: compiled vanilla against compiled routed decoding (dynamo's eager
    backend here: every fixed path compiles a whole-step graph), with targets."""
    from drllm.bench.report import tables

    cfg = BenchConfig.for_run(True, torch.device("cpu"), suites=("compile", "kernels"), compile_backend="eager")
    data = run_bench(random_model("tiny"), cfg, log=lambda *a: None)
    printed = "\n".join(title for title, _, _ in tables(data))
    assert "compiled decoding" in printed and "targets" in printed
    rows = {r["variant"]: r for r in data["suites"]["compile"]}
    assert set(rows) == {"vanilla (again)", "vanilla (per block)", "all-execute", "skip 3", "skip 5", "vocabulary 0",
                         "vocabulary 1", "vocabulary 2", "routers", "summary"}
    summary = rows.pop("summary")
    assert summary["graphs_compiled"] > 0 and summary["noise"] >= 0 and len(summary["decided_path"]) == 8
    for name, r in rows.items():
        assert r["ms"] > 0 and r["ratio"] > 0 and 0 < r["ideal_ratio"] <= 1
        assert r["blocks"] == {"skip 3": 5, "skip 5": 3}.get(name, r["blocks"])
    assert rows["routers"]["blocks"] == sum(summary["decided_path"]) == 8 - summary["budget"]
    assert all(rows[name]["graph_compile_s"] > 0 for name in ("all-execute", "skip 3", "vocabulary 0"))
    assert {r["op"] for r in data["suites"]["kernels"]} == {"gather_rows", "scatter_rows", "pooled_router_logits"}
    assert all(r["GB_s"] > 0 and r["share_of_copy"] > 0 for r in data["suites"]["kernels"])
    _check_targets(data, {"all_execute_vs_vanilla_compiled", "fixed_path_share_of_ideal_compiled",
                          "compiled_graphs_after_first_round"})


def test_bench_refuses_a_patched_model_and_unknown_suites():
    model = random_model("tiny")
    cfg = BenchConfig(suites=("nope",))
    with pytest.raises(ValueError, match="unknown suite"):
        run_bench(model, cfg, log=lambda m: None)
    drllm.patch(model)
    with pytest.raises(ValueError, match="unpatched"):
        run_bench(model, BenchConfig(), log=lambda m: None)


@pytest.mark.parametrize("batch", [8, 64])
def test_sampled_paths_match_the_paper_statistics(batch):
    g = torch.Generator().manual_seed(batch)
    paths = torch.cat([workload.sample_paths(batch, 30, generator=g) for _ in range(4000 // batch)])
    assert paths.shape[1] == 30 and paths.min() >= 0 and paths.max() <= 2
    stats = workload.path_statistics(paths)
    assert abs(stats["skip"] - workload.PAPER_SKIP) < 0.01
    assert abs(stats["repeat"] - workload.PAPER_REPEAT) < 0.005
    # Agreement is a within-batch property: measure it per sampled batch.
    per_batch = [workload.path_statistics(workload.sample_paths(batch, 30, generator=g))["agreement"] for _ in range(200)]
    assert abs(sum(per_batch) / len(per_batch) - workload.PAPER_AGREEMENT) < 0.01


def test_sampled_paths_other_rates_and_edge_cases():
    g = torch.Generator().manual_seed(0)
    paths = workload.sample_paths(40, 12, agreement=0.95, skip=0.2, repeat=0.1, generator=g)
    stats = workload.path_statistics(torch.cat([paths] + [workload.sample_paths(40, 12, 0.95, 0.2, 0.1, g) for _ in range(1000)]))
    assert abs(stats["skip"] - 0.2) < 0.02 and abs(stats["repeat"] - 0.1) < 0.02
    assert (workload.sample_paths(50, 3, skip=0.9, repeat=0.0, generator=g).sum(1) >= 1).all(), "no empty path"
    assert workload.path_statistics(torch.ones(1, 5, dtype=torch.long))["agreement"] == 1.0
    with pytest.raises(ValueError, match="rates"):
        workload.sample_paths(2, 4, skip=0.8, repeat=0.5)


def test_union_passes_and_evenly_skipped_paths():
    paths = torch.tensor([[1, 0, 2, 1], [1, 0, 1, 0], [0, 0, 1, 2]])
    assert workload.union_passes(paths) == 3 + 2  # blocks 0, 2, 3 run once; 2 and 3 repeated by some row
    for k in (0, 3, 5, 8):
        p = workload.evenly_skipped_path(30, k)
        assert int((p == 0).sum()) == k and p[0] == 1 and p[-1] == 1 and set(p.tolist()) <= {0, 1}
    assert int((policy_paths(8, 6, 0.5)[:, 0] >= 1).sum()) == 4


def test_crossover_is_the_fraction_from_which_select_wins():
    rows = [{"batch": 8, "active_fraction": f, "select_vs_gather": r} for f, r in ((0.25, 1.2), (0.5, 0.9), (0.75, 1.05), (0.9, 0.8))]
    rows += [{"batch": 16, "active_fraction": f, "select_vs_gather": r} for f, r in ((0.5, 1.1), (0.9, 1.2))]
    rows += [{"batch": 32, "active_fraction": f, "select_vs_gather": r} for f, r in ((0.5, 0.9), (0.9, 0.95))]
    assert crossover(rows) == {"8": 0.9, "16": None, "32": 0.5}


# --------------------------------------------------------------------------- executor optimisations


def _paths(batch: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    paths = torch.randint(0, 3, (batch, L), generator=g)
    paths[0] = torch.tensor([0, 1, 2, 1])
    paths[1] = torch.tensor([2, 1, 1, 0])
    paths[paths.sum(1) == 0, 1] = 1
    return paths


def _generate(model, ids, mask, n=7, **kw):
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                         pad_token_id=0, output_logits=True, return_dict_in_generate=True, **kw)
    return out.sequences, torch.stack(out.logits, dim=1)


@pytest.fixture
def policy():
    previous = plan.set_row_policy("auto")
    yield plan.set_row_policy
    plan.restore_row_policy(previous)


@torch.no_grad()
@pytest.mark.parametrize("family", ["llama", "mistral", "qwen3"])
@pytest.mark.parametrize("cache_implementation", [None, "static"])
def test_select_policy_equals_gather_and_recomputation(family, cache_implementation, policy):
    """Running all rows and selecting gives what gathering gives, and what recomputation gives."""
    model = tiny_model(family, seed=21)
    ids, mask = random_batch(5, 9, seed=22)
    paths = _paths(5, seed=23)
    results = {}
    for name in ("gather", "select"):
        policy(name)
        with drllm.forced_paths(model, paths):
            results[name] = _generate(model, ids, mask, cache_implementation=cache_implementation)
    policy("gather")
    seq, logits = results["select"]
    assert torch.equal(seq, results["gather"][0])
    torch.testing.assert_close(logits, results["gather"][1], rtol=1e-5, atol=1e-5)
    full_mask = torch.cat([mask, torch.ones(5, seq.shape[1] - ids.shape[1], dtype=mask.dtype)], 1)
    with drllm.forced_paths(model, paths):
        full = model(input_ids=seq, attention_mask=full_mask, use_cache=False).logits[:, ids.shape[1] - 1 : -1]
    torch.testing.assert_close(logits, full, rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_select_policy_plans_and_slot_rows(policy):
    """Selected passes keep every row in their cache slot; gathered ones only their rows; cache-free forwards gather."""
    model = tiny_model("llama", seed=24)
    ids, mask = random_batch(4, 6, seed=25)
    paths = torch.tensor([[1, 0, 2, 1], [1, 1, 1, 1], [0, 1, 2, 1], [1, 1, 1, 2]])
    policy("auto", select_from=0.5)  # select when at least half of the rows run the pass
    current, cpu = plan.current_policy(), torch.device("cpu")
    first = plan.plan_block(paths[:, 0], cpu, current, {})
    assert first[0].mode == Rows.SELECT and first[0].mask.shape == (4, 1, 1) and first[1].mode == Rows.NONE
    assert plan.plan_block(paths[:, 2], cpu, current, {})[1].mode == Rows.SELECT
    assert plan.plan_block(paths[:, 3], cpu, current, {})[1].mode == Rows.SOME  # 1 of 4 rows
    with drllm.forced_paths(model, paths):
        out = model(input_ids=ids, attention_mask=mask, use_cache=True)
        rows = [layer.keys.shape[0] if layer.is_initialized else 0 for layer in output_cache(out).layers]
        assert rows[:L] == [4, 4, 4, 4] and rows[L:] == [0, 0, 4, 1]
        policy("gather")
        gathered = model(input_ids=ids, attention_mask=mask, use_cache=True)
        rows = [layer.keys.shape[0] if layer.is_initialized else 0 for layer in output_cache(gathered).layers]
        assert rows[:L] == [3, 3, 4, 4] and rows[L:] == [0, 0, 2, 1]
        torch.testing.assert_close(out.logits, gathered.logits, rtol=1e-5, atol=1e-5)
        # Cache-free forwards gather whatever the policy: the rows run are exactly the active rows.
        policy("select")
        seen = []
        hook = model.model.layers[0].self_attn.register_forward_hook(
            lambda m, a, kw, o: seen.append(kw["hidden_states"].shape[0]), with_kwargs=True)
        model(input_ids=ids, attention_mask=mask, use_cache=False)
        hook.remove()
        assert seen == [3]


def test_row_policy_setting_is_validated(policy):
    with pytest.raises(ValueError, match="row policy"):
        policy("sometimes")
    assert plan.row_policy()["policy"] == "auto"


@torch.no_grad()
def test_hoisted_pooling_equals_routers_logits():
    model = tiny_model("qwen2", seed=26)
    routers = drllm.Routers.for_model(model, num_windows=3)
    ids, mask = random_batch(4, 10, seed=27, padding="right")
    hidden = torch.randn(4, 10, 48)
    pooling = Pooling(routers, mask)
    for block in range(L):
        assert torch.equal(pooling.logits(block, hidden), routers.logits(block, hidden, mask))


@torch.no_grad()
def test_blocks_share_row_subsets_within_a_call(policy):
    """Blocks with the same row set restrict the per-row inputs once per forward call."""
    model = tiny_model("llama", seed=28)
    ids, mask = random_batch(3, 7, seed=29)
    paths = torch.tensor([[1, 1, 1, 1], [0, 0, 0, 1], [1, 1, 1, 1]])  # blocks 0-2 share rows {0, 2}
    policy("gather")
    calls = []
    original = executor.row_subset
    executor.row_subset = lambda *a: calls.append(1) or original(*a)
    try:
        with drllm.forced_paths(model, paths):
            shared = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    finally:
        executor.row_subset = original
    assert len(calls) == 1
    for row in range(3):
        with drllm.forced_paths(model, paths[row]):
            alone = model(input_ids=ids[row : row + 1], attention_mask=mask[row : row + 1], use_cache=False).logits
        torch.testing.assert_close(shared[row, mask[row].bool()], alone[0, mask[row].bool()], rtol=1e-5, atol=1e-5)
