"""Budget routers from damage targets: offline features equal what the runtime pools, fitting learns a planted
ranking, the label-free head trains without gold answers, the vocabulary and the oracle equal explicit loops,
and greedy selection with a shortlist or over resamples."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from conftest import tiny_model
from tiny_tokenizer import make_tiny_tokenizer

import drllm
from drllm.eval.baselines import greedy_skip_sets
from drllm.eval.budget import PathScores, score_budget, skip_vocabulary
from drllm.eval.budget_selection import BudgetSettings, saved_companions, select_budget_routers
from drllm.eval.compare import choose_baselines, compare
from drllm.eval.scoring import evaluate
from drllm.paths import path_to_str, skip_set_path
from drllm.routing import BudgetRouters
from drllm.search.mcts import skip_run_ok
from drllm.tasks import Example, encode_prompt, score_choices
from drllm.tasks.prompts import cloze_context
from drllm.train import (BudgetConfig, damage_targets, fit_budget_routers, measure_damage, predict, tap_features)
from drllm.train.budget import listwise_loss, output_groups

pytestmark = pytest.mark.usefixtures("one_thread")

L = 6


WORDS = ("sky", "river", "stone", "light", "seed", "cloud", "iron", "salt", "moon", "leaf", "heat", "sound")


def items(n=12, seed=0):
    out = []
    for i in range(n):
        choices = ("red", "a blue sky", "green grass", f"number {i}")[: 3 + i % 2]
        words = " ".join(WORDS[(i * 7 + j * (seed + 5)) % len(WORDS)] for j in range(3 + i % 5))
        out.append(Example(id=f"q{seed}-{i}", task="arc_easy", question=f"Which {words} is it {i}?",
                           answer="ABCD"[i % len(choices)], choices=choices, labels=tuple("ABCD"[: len(choices)]),
                           gold_index=i % len(choices)))
    return out


@pytest.fixture(scope="module")
def setup():
    return tiny_model("llama", seed=5, num_layers=L, initializer_range=0.3), make_tiny_tokenizer()


def tokens(tok, ex):
    return encode_prompt(tok, cloze_context(ex, tok, style="plain"), cloze=True)


def test_offline_features_give_the_runtime_picks(setup):
    """predict() on tap_features equals BudgetRouters.scores on the state the runtime pools, and the patched
    model's paths are pick() of it: training sees exactly what routing will see."""
    model, tok = setup
    exs = items(5)
    torch.manual_seed(0)
    for tap in (0, 2):
        routers = BudgetRouters.for_model(model, tap=tap, head="blocks")
        torch.nn.init.normal_(routers.mlp.fc2.weight, std=1.0)
        means, valid = tap_features(model, [tokens(tok, e) for e in exs], [tap], batch_size=2)[tap]
        offline = predict(routers, means, valid)
        for i, ex in enumerate(exs):
            ids = torch.tensor([tokens(tok, ex)])
            states = drllm.block_states(model, input_ids=ids)
            online = routers.scores(states[tap], torch.ones_like(ids))
            torch.testing.assert_close(offline[i : i + 1], online, rtol=1e-5, atol=1e-5)
            drllm.patch(model, routers, budget=2)
            try:
                out = model(input_ids=ids)
            finally:
                drllm.unpatch(model)
            assert torch.equal(out.paths, routers.pick(offline[i : i + 1], 2))


def test_fitting_learns_a_planted_ranking():
    """Damage that depends on the features: after fitting, the picks on held-out rows are the truly least
    damaging blocks far more often than chance, and the listwise loss falls."""
    torch.manual_seed(1)
    H, W, n = 16, 3, 400
    direction = torch.randn(H)
    means = torch.randn(n, W, H)
    valid = torch.ones(n, W, dtype=torch.bool)
    side = (means.mean(1) @ direction > 0).float()  # which half of the blocks is cheap depends on the input
    damage = torch.zeros(n, L)
    damage[:, 1:4] = (1 - side)[:, None] * 2 + torch.rand(n, 3) * 0.1
    damage[:, 4:] = side[:, None] * 2 + torch.rand(n, 2) * 0.1
    routers = BudgetRouters("llama", H, L, tap=1, head="blocks", hidden=32)
    groups, temps = output_groups(routers), [1.0]
    with torch.no_grad():
        before = float(listwise_loss(predict(routers, means[300:], valid[300:]), damage[300:], groups, temps))
    fit = fit_budget_routers(routers, (means[:300], valid[:300], damage[:300]),
                             (means[300:], valid[300:], damage[300:]), BudgetConfig(head="blocks", epochs=150, lr=1e-2))
    with torch.no_grad():
        after = float(listwise_loss(predict(routers, means[300:], valid[300:]), damage[300:], groups, temps))
        picks = routers.pick(predict(routers, means[300:], valid[300:]), 2)
    assert after < before and fit["epoch"] >= 1
    cheap = damage[300:] < 1  # the half that is cheap for that input (blocks >= tap)
    cheap[:, 0] = False
    skipped = picks == 0
    # chance (2 of the 5 blocks, both in the cheap half) is about 0.2
    assert ((skipped & ~cheap).sum(1) == 0).float().mean() > 0.75, "held-out rows skip their cheap blocks"


def test_the_label_free_head_trains_without_gold_answers(setup, tmp_path):
    """KL targets measured with labels=False read no gold answer: the same items with their answers removed give
    the same records and the same fitted routers."""
    model, tok = setup
    exs = items(8)
    blind = [dataclasses.replace(e, answer="", gold_index=None) for e in exs]
    singles = [[b] for b in range(1, L)]
    fitted = []
    for name, data in (("gold", exs), ("blind", blind)):
        records = measure_damage(model, tok, data, tmp_path / f"{name}.jsonl", candidates=singles, labels=False,
                                 progress=False)
        assert all("margin" not in r and "correct" not in r for r in records)
        routers = BudgetRouters.for_model(model, tap=1, head="blocks")
        means, valid = tap_features(model, [r["routing_tokens"] for r in records], [1])[1]
        target = damage_targets(records, singles, routers, "kl")
        fit_budget_routers(routers, (means, valid, target), None, BudgetConfig(head="blocks", target="kl", epochs=20))
        fitted.append(routers.state_dict())
    for k in fitted[0]:
        assert torch.equal(fitted[0][k], fitted[1][k])
    with pytest.raises(ValueError, match="'margin'"):
        damage_targets(records, singles, BudgetRouters.for_model(model, tap=1, head="blocks"), "margin")


def explicit_correct(model, tok, ex, skips):
    with drllm.forced_paths(model, [int(c) for c in skip_set_path(L, skips)]):
        return int(score_choices(model, tok, [ex])[0].correct)


def test_vocabulary_is_the_static_set_then_sets_of_the_items_it_hurts(setup):
    model, tok = setup
    exs = items(10)
    scores = PathScores(model, tok, exs)
    vocab = skip_vocabulary(scores, list(range(len(exs))), [1, 2], 3, allowed=set(range(1, L)), min_hurt=1)

    def without_block_0(score):  # the vocabulary's blocks: 1 to L - 1
        return lambda paths: [score([p])[0] if p[0] == "1" else (-1.0, float("-inf")) for p in paths]

    static = greedy_skip_sets(without_block_0(scores.scorer(list(range(len(exs))))), L, 2)
    vanilla = [int(score_choices(model, tok, [e])[0].correct) for e in exs]
    for k, sets in vocab.items():
        assert sets[0] == static[k]
        for v in range(1, len(sets)):  # each later set was chosen on the items every earlier set hurts
            hurt = [i for i, e in enumerate(exs) if vanilla[i] and not any(explicit_correct(model, tok, e, s)
                                                                         for s in sets[:v])]
            assert hurt and sets[v] == greedy_skip_sets(without_block_0(scores.scorer(hurt)), L, k)[k]
        assert all(min(s) >= 1 and skip_run_ok(skip_set_path(L, s), 2) for s in sets)
    assert max(len(s) for s in vocab.values()) > 1, "some set covers items the static set hurts"


def budget_oracle(model, tok, exs, routers, ks):
    scored = score_budget(model, tok, exs, ["1" * L], {"routers": routers}, ks, oracle=routers)
    return {k: ([r["path"] for r in rows], [r["correct"] for r in rows]) for k, rows in scored["oracle"].items()}


def test_forced_scoring_of_the_picks_equals_routed_scoring(setup):
    """score_budget scores each routers' pick as a forced path; the patched model scoring the same items with the
    routers at that budget (routing on the context, as evaluation runs it) takes the same paths and answers."""
    model, tok = setup
    exs = items(7)
    for head, sets in (("blocks", None), ("sets", {1: [[2], [4]], 2: [[1, 3], [2, 5], [3, 4]]})):
        torch.manual_seed(2)
        routers = BudgetRouters.for_model(model, tap=1, head=head, sets=sets)
        torch.nn.init.normal_(routers.mlp.fc1.weight, std=1.0)  # sensitive to the input: rows differ
        torch.nn.init.normal_(routers.mlp.fc2.weight, std=1.0)
        scored = score_budget(model, tok, exs, ["1" * L], {"routers": routers}, [1, 2])
        distinct = 0
        for k in (1, 2):
            routed = [e["routed_row"] for e in evaluate(model, tok, routers, exs, budget=k)["examples"]]
            assert [r["path"] for r in scored["picks"]["routers"][k]] == [r["path"] for r in routed]
            assert [r["correct"] for r in scored["picks"]["routers"][k]] == [r["correct"] for r in routed]
            distinct = max(distinct, len({r["path"] for r in routed}))
        assert distinct > 1, "rows take different paths"


def test_the_oracle_is_the_best_choice_known_from_the_answer(setup):
    model, tok = setup
    exs = items(6)
    sets_head = BudgetRouters.for_model(model, tap=1, head="sets", sets={1: [[2], [4]], 2: [[1, 3], [2, 5]]})
    oracle = budget_oracle(model, tok, exs, sets_head, [1, 2])
    for k in (1, 2):
        expected = [int(any(explicit_correct(model, tok, e, s) for s in sets_head.sets[k])) for e in exs]
        assert oracle[k][1] == expected
    blocks_head = BudgetRouters.for_model(model, tap=1, head="blocks")
    oracle = budget_oracle(model, tok, exs, blocks_head, [2])
    for ex, path, right in zip(exs, *oracle[2]):
        full = score_choices(model, tok, [ex])[0].margin
        damage = torch.zeros(1, L)
        for b in range(1, L):
            with drllm.forced_paths(model, [int(c) for c in skip_set_path(L, [b])]):
                damage[0, b] = full - score_choices(model, tok, [ex])[0].margin
        assert path == path_to_str(blocks_head.pick(damage, 2)[0])
        skips = [i for i, c in enumerate(path) if c == "0"]
        assert right == explicit_correct(model, tok, ex, skips)


def test_greedy_shortlist_and_resampled_static_sets(setup):
    model, tok = setup
    exs = items(8)
    scores = PathScores(model, tok, exs)
    score = scores.scorer(list(range(len(exs))))
    assert greedy_skip_sets(score, L, 3, shortlist=L) == greedy_skip_sets(score, L, 3)
    short = greedy_skip_sets(score, L, 2, shortlist=3)
    firsts = sorted(range(L), key=lambda b: (score([skip_set_path(L, [b])])[0], -b), reverse=True)[:3]
    assert short[1] == firsts[:1] and set(short[2]) <= set(firsts)
    sets, info = choose_baselines(model, tok, [("static", [1, 2])], calibration=exs, resamples=3)
    assert len(sets["static-resampled"][2]) == 3 and len(info["static-resampled"]["calibration_ids"]) == 3
    for draw, chosen in zip(info["static-resampled"]["calibration_ids"], sets["static-resampled"][2]):
        sample = [next(e for e in exs if e.id == i) for i in draw]
        assert chosen == greedy_skip_sets(PathScores(model, tok, sample).scorer(list(range(len(sample)))), L, 2)[2]


def test_select_budget_routers_end_to_end(setup, tmp_path):
    model, tok = setup
    exs = items(15)
    settings = BudgetSettings(budgets=(1, 2), tap=1, vocabulary_size=2, vocabulary_items=6, allowed=4, epochs=5)
    selection = select_budget_routers(model, tok, exs, tmp_path, settings=settings, progress=False, log=lambda m: None)
    written = json.loads((tmp_path / "selection.json").read_text())
    assert written["kind"] == "budget" and written["head"] == selection["head"]
    assert {(e["head"], e["target"]) for e in written["scored"]} == {(h, t) for h in ("blocks", "sets")
                                                                    for t in ("margin", "kl")}
    assert len(written["dev_ids"]) == 3 and set(written["dev_ids"]) <= {e.id for e in exs}
    chosen = BudgetRouters.from_pretrained(tmp_path)
    assert chosen.head == selection["head"] and (tmp_path / "label-free" / "budget_routers.safetensors").is_file()
    best = max(e["mean_accuracy"] for e in written["scored"])
    assert next(e for e in written["scored"] if (e["head"], e["target"]) == (chosen.head, written["target"]))[
        "mean_accuracy"] == best
    for k in ("1", "2"):  # the sets oracle is at least as good as any router choosing among the same sets
        routed = [e["budgets"][k]["accuracy"] for e in written["scored"] if e["head"] == "sets"]
        assert written["dev_oracle"]["sets"][k] >= max(routed) - 1e-9
    again = select_budget_routers(model, tok, exs, tmp_path, settings=settings, progress=False, log=lambda m: None)
    assert again["scored"] == selection["scored"], "a rerun resumes from the files and chooses the same"
    # the chosen head and target retrained on bootstrap resamples, on the dev draws static selection makes
    dev = [e for e in exs if e.id in set(written["dev_ids"])]
    _, info = choose_baselines(model, tok, [("static", [1])], calibration=dev, resamples=settings.resamples)
    assert written["resampled"]["dev_ids"] == info["static-resampled"]["calibration_ids"]
    free, resampled = saved_companions(tmp_path, written)
    assert free.head == written["label_free"]["head"] and len(resampled) == settings.resamples == 3
    assert all(r.head == chosen.head for r in resampled)
    weights = [r.mlp.fc2.weight for r in (chosen, *resampled)]
    assert all(not torch.equal(a, b) for i, a in enumerate(weights) for b in weights[i + 1:])
    fewer = select_budget_routers(model, tok, exs, tmp_path, settings=dataclasses.replace(settings, resamples=1),
                                  progress=False, log=lambda m: None)
    assert len(saved_companions(tmp_path, fewer)[1]) == 1 and not (tmp_path / "resampled" / "1").exists()


def test_resampled_routers_are_one_row_per_budget_with_their_spread(setup):
    """compare's routers-resampled rows: one per budget, each retrain a run; retrains equal to the routers give
    the routers' own items in every run and no spread."""
    model, tok = setup
    torch.manual_seed(3)
    routers = BudgetRouters.for_model(model, tap=1, head="blocks")
    exs = items(5, seed=2)
    res = compare(model, tok, exs, routers=routers, budgets=[1, 2], skip_sets=({}, {}), resampled=[routers] * 2)
    by = {(m["method"], m["setting"]): m for m in res["methods"]}
    for k in (1, 2):
        row = by[("routers-resampled", f"budget {k}")]
        assert row["budget"] == k and row["blocks_per_pass"] == L - k and len(row["runs"]) == 2
        assert all(run["items"] == by[("routers", f"budget {k}")]["items"] for run in row["runs"])
        assert row["accuracy"] == by[("routers", f"budget {k}")]["accuracy"] and row["spread"]["std"] == 0
