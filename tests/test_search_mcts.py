"""Length-aware MCTS on synthetic rewards: known optima, constraints, reproducibility."""

from __future__ import annotations

import hashlib
import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from drllm.search import MCTSConfig, PathResult, actions, apply_action, is_valid_path, mcts_search, rank_key


def synthetic(correct, margin=lambda p: -p.count("2")):
    """An evaluator scoring path strings with ``correct(path)``; records every batch it gets."""
    calls = []

    def evaluate(paths):
        calls.append(list(paths))
        return [PathResult(p, int(bool(correct(p))), float(margin(p)), sum(map(int, p))) for p in paths]

    evaluate.calls = calls
    return evaluate


def test_actions_and_validity():
    assert set(actions("1211")) == {("skip1", 0), ("skip1", 2), ("skip1", 3), ("skip2", 2),
                                    ("repeat", 0), ("repeat", 2), ("repeat", 3)}
    assert apply_action("1111", ("skip2", 1)) == "1001"
    assert apply_action("1111", ("repeat", 3)) == "1112"
    assert is_valid_path("1001") and is_valid_path("2222")
    assert not is_valid_path("10001")  # three consecutive skips
    assert not is_valid_path("00")  # empty
    assert not is_valid_path("1211", cap=4)  # longer than the cap
    assert not is_valid_path("1311") and not is_valid_path("")


def test_finds_known_optimum():
    """Correct iff blocks 1 and 4 are skipped: the shortest correct paths have length 2 (no 3 skips in a
    row), and with equal margins the tie goes to the smaller string, 001001."""
    for seed in range(3):
        ev = synthetic(lambda p: p[1] == "0" and p[4] == "0")
        res = mcts_search(ev, 6, MCTSConfig(simulations=200, early_stop=False, seed=seed))
        assert res.best.path == "001001" and res.best.length == 2
        assert res.good[0] == res.best and all(g.reward == 1 for g in res.good)


def test_margin_breaks_ties_between_equally_short_paths():
    """Among the correct paths of the shortest length, the largest margin wins."""
    target = "110211"
    ev = synthetic(lambda p: p.count("0") == 1 and p.count("2") <= 1,
                   margin=lambda p: 1.0 if p == target else 0.0)
    res = mcts_search(ev, 6, MCTSConfig(simulations=400, early_stop=False, seed=0))
    # correct paths have exactly one skip: length 5 without a repeat, so the target (length 6) is not best
    assert res.best.length == 5
    ev = synthetic(lambda p: p in (target, "111201", "211101"), margin=lambda p: 1.0 if p == target else 0.5)
    res = mcts_search(ev, 6, MCTSConfig(simulations=400, early_stop=False, seed=0))
    assert res.best.path == target


def test_exhaustive_search_matches_brute_force():
    """With enough simulations every valid path is evaluated once, so the best is the true optimum."""
    L = 4

    def correct(p):
        return int(hashlib.sha256(p.encode()).hexdigest(), 16) % 3 == 0

    ev = synthetic(correct, margin=lambda p: int(hashlib.md5(p.encode()).hexdigest(), 16) % 1000 / 1000)
    res = mcts_search(ev, L, MCTSConfig(simulations=10_000, early_stop=False, seed=1))
    valid = ["".join(p) for p in itertools.product("012", repeat=L) if is_valid_path("".join(p))]
    assert sorted(r.path for r in res.evaluated) == sorted(valid)  # each exactly once (memo + DAG)
    assert res.simulations == len(valid) - 1
    brute = sorted(ev(valid), key=rank_key)
    assert res.best == brute[0]


def test_early_stop_when_shorter_correct_path_found():
    ev = synthetic(lambda p: True)
    res = mcts_search(ev, 30, MCTSConfig(seed=0, batch=8))
    assert res.stopped_early and res.simulations == 8 and len(ev.calls) == 2  # default, then one batch
    assert res.best.length < 30
    ev = synthetic(lambda p: False)
    res = mcts_search(ev, 30, MCTSConfig(seed=0))
    assert not res.stopped_early and res.simulations == 50 and res.best is None and res.good == []


def test_repeat_only_correct_does_not_stop_early():
    """A correct path that is not shorter than the default does not stop the search."""
    ev = synthetic(lambda p: "0" not in p)
    res = mcts_search(ev, 10, MCTSConfig(seed=0, simulations=30))
    assert not res.stopped_early and res.simulations == 30
    assert res.best.path == "1" * 10  # the default is correct and shortest among correct paths


def test_real_tree_search_goes_deep():
    """Selection descends through internal nodes (progressive widening), not only the root's children."""
    ev = synthetic(lambda p: False)
    res = mcts_search(ev, 30, MCTSConfig(seed=0, simulations=50))
    assert res.max_depth >= 2
    depths = {sum(c != "1" for c in r.path) for r in res.evaluated}  # edits per path (skip2 counts 2)
    assert max(depths) >= 3


def test_batched_evaluation_calls():
    """Each batched call gets up to ``batch`` new paths; nothing is sent twice."""
    ev = synthetic(lambda p: False)
    mcts_search(ev, 12, MCTSConfig(seed=3, simulations=40, batch=8))
    sizes = [len(c) for c in ev.calls]
    assert sizes == [1, 8, 8, 8, 8, 8]
    flat = [p for c in ev.calls for p in c]
    assert len(flat) == len(set(flat))


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), L=st.integers(3, 9), cap_extra=st.integers(0, 9),
       batch=st.integers(1, 6), sims=st.integers(1, 60), early=st.booleans(), density=st.integers(0, 4))
def test_constraints_never_violated(seed, L, cap_extra, batch, sims, early, density):
    cap = L + min(cap_extra, L)

    def correct(p):
        return int(hashlib.sha256(f"{seed}{p}".encode()).hexdigest(), 16) % 5 < density

    ev = synthetic(correct, margin=lambda p: int(hashlib.md5(p.encode()).hexdigest(), 16) % 997 / 997)
    cfg = MCTSConfig(seed=seed, simulations=sims, batch=batch, length_cap=cap, early_stop=early)
    res = mcts_search(ev, L, cfg)
    for r in res.evaluated:
        assert is_valid_path(r.path, cap=cap), r.path
        assert "000" not in r.path and 0 < r.length <= cap and len(r.path) == L
    assert res.simulations <= sims and len(res.evaluated) == res.simulations + 1
    assert all(g.reward == 1 for g in res.good)
    assert [g.path for g in res.good] == [r.path for r in sorted(res.good, key=rank_key)]
    correct_paths = [r for r in res.evaluated if r.reward]
    if correct_paths:
        assert res.best == min(correct_paths, key=rank_key)
    else:
        assert res.best is None and res.good == []
    # reproducible: the same seed gives the same search
    again = mcts_search(synthetic(correct, margin=lambda p: int(hashlib.md5(p.encode()).hexdigest(), 16) % 997 / 997),
                        L, cfg)
    assert [r.path for r in again.evaluated] == [r.path for r in res.evaluated]


def test_cap_below_default_rejected():
    with pytest.raises(ValueError, match="length_cap"):
        mcts_search(synthetic(lambda p: True), 6, MCTSConfig(length_cap=5))
