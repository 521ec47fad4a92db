"""Path evaluator on tiny random models: packed + prefix-reused batches equal plain per-path scoring."""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch
from conftest import tiny_model

import drllm
from drllm.paths import path_from_str
from drllm.search import MCTSConfig, PathEvaluator, is_valid_path, mcts_search, rank_key
from drllm.tasks import Example, generate_answers, score_choices

# Tiny models are all per-op overhead: one intra-op thread is faster (far faster on a busy machine).
pytestmark = pytest.mark.usefixtures("one_thread")

EXAMPLE = Example(
    id="toy-1", task="arc_easy", question="Which is a planet?", answer="B",
    choices=("a rock", "Mars", "the Moon's shadow", "x"), labels=("A", "B", "C", "D"), gold_index=1,
)
PATHS = ["1111", "1101", "0111", "1211", "1112", "2001", "1021", "1100", "0210", "2222"]


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_batched_prefix_equals_plain(family, tok):
    model = tiny_model(family, seed=5)
    fast = PathEvaluator(model, tok, EXAMPLE, max_paths=4)
    plain = PathEvaluator(model, tok, EXAMPLE, prefix=False, pack=False, max_paths=1)
    unpacked = PathEvaluator(model, tok, EXAMPLE, pack=False, max_paths=3)
    a, b, c = fast.evaluate(PATHS), plain.evaluate(PATHS), unpacked.evaluate(PATHS)
    for path, x, y, z in zip(PATHS, a, b, c):
        with drllm.forced_paths(model, path_from_str(path)):
            ref = score_choices(model, tok, [EXAMPLE])[0]
        for r in (x, y, z):
            assert r.path == path and r.length == sum(map(int, path))
            assert r.reward == ref.correct
            assert r.margin == pytest.approx(ref.margin, abs=1e-5)
    assert not drllm.is_patched(model)


def test_prefix_skips_shared_blocks(tok):
    """Rows start at their first edited block: fewer block applications than running every row fully."""
    model = tiny_model("llama", seed=6)
    ev = PathEvaluator(model, tok, EXAMPLE, max_paths=8)
    runs = []
    hooks = [blk.self_attn.register_forward_hook(lambda m, a, kw, out: runs.append(kw["hidden_states"].shape[0]),
                                                 with_kwargs=True) for blk in model.model.layers]
    try:
        ev.evaluate(["1110", "1120", "1101"])
    finally:
        for h in hooks:
            h.remove()
    # packed: one row per path; 1110 runs nothing, 1120 runs block 2 twice, 1101 runs block 3 only
    assert sum(runs) == 0 + 2 + 1


def test_memoisation(tok):
    model = tiny_model("llama", seed=7)
    ev = PathEvaluator(model, tok, EXAMPLE, max_paths=3)
    assert ev.evaluations == 1 and ev.default.path == "1111"
    first = ev.evaluate(["1101", "0111", "1101", "1111"])
    assert ev.evaluations == 3 and first[0] is first[2]
    calls = ev.calls
    again = ev.evaluate([torch.tensor([1, 1, 0, 1]), [0, 1, 1, 1]])
    assert ev.calls == calls and ev.evaluations == 3
    assert again == [first[0], first[1]]


def test_chat_style_context(tok):
    model = tiny_model("llama", seed=8)
    ev = PathEvaluator(model, tok, EXAMPLE, style="chat")
    assert ev.prompt.startswith("<|im_start|>user") and ev.prompt.endswith("assistant\n")
    with drllm.forced_paths(model, path_from_str("1011")):
        ref = score_choices(model, tok, [EXAMPLE], style="chat")[0]
    assert ev.evaluate(["1011"])[0].margin == pytest.approx(ref.margin, abs=1e-5)


def test_generation_mode_matches_per_path_generation(tok):
    model = tiny_model("llama", seed=9)
    ex = Example(id="g1", task="gsm8k", question="What is 2+2?", answer="4")
    ev = PathEvaluator(model, tok, ex, mode="generate", max_paths=3, max_new_tokens=6)
    paths = ["1101", "2111", "1011", "1121"]
    results = ev.evaluate(paths)
    assert ev.calls == 3  # default, then 3 + 1 paths
    for path, r in zip(paths, results):
        with drllm.forced_paths(model, path_from_str(path)):
            g = generate_answers(model, tok, [ex], max_new_tokens=6)[0]
        assert r.prediction == g.prediction and r.reward == g.correct and r.margin is None


def test_mcts_on_tiny_model_finds_brute_force_optimum(tok):
    """The real log-likelihood reward of a tiny model: an exhaustive search returns the best valid path."""
    model = tiny_model("llama", seed=10, num_layers=3)
    ev = PathEvaluator(model, tok, EXAMPLE, max_paths=8)
    res = mcts_search(ev.evaluate, 3, MCTSConfig(simulations=1000, early_stop=False, seed=0))
    valid = ["".join(p) for p in itertools.product("012", repeat=3) if is_valid_path("".join(p))]
    assert ev.evaluations == len(valid)
    brute = sorted(PathEvaluator(model, tok, EXAMPLE, prefix=False, pack=False).evaluate(valid), key=rank_key)
    correct = [r for r in brute if r.reward]
    if correct:
        assert res.best.path == correct[0].path
        assert [g.path for g in res.good] == [r.path for r in correct]
    else:
        assert res.best is None


def test_rejects_non_choice_example_in_loglik(tok):
    model = tiny_model("llama", seed=1)
    with pytest.raises(ValueError, match="multiple-choice"):
        PathEvaluator(model, tok, Example(id="x", task="gsm8k", question="1+1?", answer="2"))
    with pytest.raises(ValueError, match="mode"):
        PathEvaluator(model, tok, EXAMPLE, mode="nope")


def test_min_margin_reward_needs_a_decisive_win(tok):
    """With ``min_margin`` a path wins only if the gold answer is correct by that margin; margins are unchanged."""
    model = tiny_model("llama", seed=11)
    # make the default path's answer the gold one, so that some paths are correct by various margins
    label = PathEvaluator(model, tok, EXAMPLE).default.prediction
    example = dataclasses.replace(EXAMPLE, answer=label, gold_index=EXAMPLE.labels.index(label))
    loose = PathEvaluator(model, tok, example, max_paths=4).evaluate(PATHS)
    correct = sorted(r.margin for r in loose if r.reward)
    assert len(correct) >= 2
    cut = correct[len(correct) // 2]  # about half of the correct paths lead by at least this much
    strict = PathEvaluator(model, tok, example, max_paths=4, min_margin=cut).evaluate(PATHS)
    for a, b in zip(loose, strict):
        assert b.margin == a.margin
        assert b.reward == int(a.reward == 1 and a.margin >= cut)
    assert 0 < sum(r.reward for r in strict) < len(PATHS)
    with pytest.raises(ValueError, match="min_margin"):
        PathEvaluator(model, tok, EXAMPLE, min_margin=-1.0)
