"""Baselines at equal compute: skip sets against hand computations, the paired test, the table, JSON and plot."""

from __future__ import annotations

import json
import math
import random
import shutil
from dataclasses import replace

import pytest
import torch
from conftest import tiny_model
from test_evaluate import arc_examples, decisive_routers
from tiny_tokenizer import make_tiny_tokenizer

import drllm
import drllm.eval.baselines as bl
from drllm.eval.compare import compare
from drllm.eval.report import frontier_legend, routers_vs_baselines, verdict
from drllm.eval.scoring import evaluate, evaluate_path
from drllm.eval.selection import read_selection
from drllm.eval.stats import (BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, mcnemar_exact, paired_test, seeded_accuracy,
                              wilson_interval)
from drllm.paths import skip_set_path
from drllm.search.mcts import skip_run_ok
from drllm.tasks import cloze_requests, encode_request

pytestmark = pytest.mark.usefixtures("one_thread")

L = 4


@pytest.fixture(scope="module")
def setup(one_thread):
    model = tiny_model("llama", seed=5, num_layers=L)
    with torch.no_grad():  # a final norm that is not a plain rescaling, so its input and output differ in angle
        model.model.norm.weight.copy_(torch.linspace(0.2, 2.0, model.config.hidden_size))
    return model, make_tiny_tokenizer(chat_template=False)


def explicit_states(model, ids: list[int], blocks) -> list[torch.Tensor]:
    """Hidden states of one unpadded row, calling ``blocks`` by hand: the input, then each block's output."""
    base = model.model
    T = len(ids)
    h = base.embed_tokens(torch.tensor([ids]))
    pos = torch.arange(T)[None]
    pe = base.rotary_emb(h, pos)
    mask = torch.full((T, T), float("-inf")).triu(1)[None, None]
    states = [h]
    for i in blocks:
        h = base.layers[i](h, attention_mask=mask, position_embeddings=pe, position_ids=pos)
        states.append(h)
    return states


def explicit_logits(model, ids, blocks) -> torch.Tensor:
    return model.lm_head(model.model.norm(explicit_states(model, ids, blocks)[-1]))[0]


# --------------------------------------------------------------------------- skip sets


@torch.no_grad()
def test_block_influence_equals_explicit_loop(setup):
    model, tok = setup
    examples = arc_examples(5)  # prompts of different lengths: the batch is padded
    sums, tokens = torch.zeros(L, dtype=torch.float64), 0
    for ex in examples:
        ctx, conts = cloze_requests(ex, tok)
        states = explicit_states(model, encode_request(tok, ctx, conts[0])[0], range(L))
        for i in range(L):
            sums[i] += torch.nn.functional.cosine_similarity(states[i][0], states[i + 1][0], dim=-1).double().sum()
        tokens += states[0].shape[1]
    expected = (1 - sums / tokens).tolist()
    influence = bl.block_influence(model, tok, examples, batch_size=3)
    assert influence == pytest.approx(expected, abs=1e-5)
    assert len(set(round(x, 4) for x in influence)) == L  # distinct: the ranking below means something
    order = sorted(range(L), key=lambda i: expected[i])
    assert bl.shortgpt_skips(influence, 2) == sorted(order[:2])
    assert not drllm.is_patched(model)


@torch.no_grad()
@pytest.mark.parametrize("k", [1, 2])
def test_exit_equals_first_blocks_then_norm_and_head(setup, k):
    model, tok = setup
    skips = bl.exit_skips(L, k)
    assert skips == list(range(L - k, L))
    path = skip_set_path(L, skips)
    examples = arc_examples(4)
    manual = []
    for ex in examples:
        ctx_text, conts = cloze_requests(ex, tok)
        scores = []
        for j, cont_text in enumerate(conts):
            ctx, cont = encode_request(tok, ctx_text, cont_text)
            ids = (ctx + cont)[:-1]
            logits = explicit_logits(model, ids, range(L - k))
            with drllm.forced_paths(model, [int(c) for c in path]):
                forced = model(input_ids=torch.tensor([ids])).logits[0]
            torch.testing.assert_close(forced, logits, rtol=1e-5, atol=1e-5)
            lp = logits[len(ctx) - 1 :].log_softmax(-1).gather(-1, torch.tensor(cont)[:, None])
            scores.append(float(lp.sum()) / len(ex.choices[j]))
        manual.append(max(range(len(scores)), key=lambda j: (scores[j], -j)))
    rows = evaluate_path(model, tok, examples, path, batch_size=3)
    assert [r["choice"] for r in rows] == manual
    assert [r["correct"] for r in rows] == [int(c == ex.gold_index) for c, ex in zip(manual, examples)]
    assert all(r["path"] == path and r["layers"] == (L - k) * r["passes"] for r in rows)


def test_random_skips_respect_constraints_and_seed():
    seen = set()
    for k in range(1, 6):
        for seed in range(20):
            skips = bl.random_skips(8, k, seed)
            assert skips == sorted(set(skips)) and len(skips) == k and all(0 <= b < 8 for b in skips)
            assert skip_run_ok(skip_set_path(8, skips), 2)
            assert bl.random_skips(8, k, seed) == skips  # seeded
            seen.add(tuple(skips))
    assert len(seen) > 50  # seeds draw different sets
    assert bl.random_skips(3, 2, 0, max_skip_run=1) == [0, 2]  # the only valid set
    with pytest.raises(ValueError, match="consecutive"):
        bl.random_skips(4, 3, 0, max_skip_run=1, tries=50)


def test_random_skip_sets_are_drawn_independently_per_k():
    """One seed's sets of different K are separate draws: seeded by the seed alone they were nested
    (seed 0 of 30 blocks: [6] in [6, 11] in [0, 4, 6, 11])."""
    num_blocks, ks = 30, (1, 2, 4, 8)
    nested_pairs = nested_chains = 0
    for seed in range(40):
        sets = [set(bl.random_skips(num_blocks, k, seed)) for k in ks]
        nested_pairs += sets[0] < sets[1]  # independent: chance 2/30 per seed, about 3 of 40
        nested_chains += all(a < b for a, b in zip(sets, sets[1:]))
    assert nested_pairs <= 8 and nested_chains == 0, (nested_pairs, nested_chains)
    # each K's sets still cover the blocks (no K is stuck on a few sets)
    for k in ks:
        assert len({b for seed in range(40) for b in bl.random_skips(num_blocks, k, seed)}) >= 20


def test_greedy_static_picks_best_set_on_constructed_case():
    gain = [0.9, 0.8, 0.7, 0.1, 0.2, 0.3]  # additive; skipping 0, 1, 2 together breaks the skip-run rule
    calls = []

    def score(paths):
        calls.append(paths)
        return [(sum(g for g, c in zip(gain, p) if c == "0"),) for p in paths]

    sets = bl.greedy_skip_sets(score, 6, 3)
    assert sets == {1: [0], 2: [0, 1], 3: [0, 1, 5]}
    assert [len(c) for c in calls] == [6, 5, 3]  # block 2 is not a candidate at step 3
    from itertools import combinations

    valid = [s for s in combinations(range(6), 3) if skip_run_ok(skip_set_path(6, s), 2)]
    assert list(max(valid, key=lambda s: sum(gain[b] for b in s))) == sets[3]
    # ties go to the lower block
    assert bl.greedy_skip_sets(lambda paths: [(0,)] * len(paths), 6, 2) == {1: [0], 2: [0, 1]}


def test_static_selection_scores_match_evaluation(setup):
    """The selection scorer (the search's path evaluator) agrees with the evaluation on every single skip."""
    model, tok = setup
    examples = arc_examples(6)
    paths = [skip_set_path(L, [b]) for b in range(L)]
    scores = bl.accuracy_scorer(model, tok, examples)(paths)
    rows = [evaluate_path(model, tok, examples, p) for p in paths]
    assert [s[0] for s in scores] == [sum(r["correct"] for r in rs) / len(examples) for rs in rows]
    margins = [sum(r["margin"] for r in rs) / len(examples) for rs in rows]
    assert [s[1] for s in scores] == pytest.approx(margins, abs=1e-4)
    assert len(set(round(m, 3) for m in margins)) == L  # the skips differ, so the choice below is not a tie
    sets, info = bl.choose_skip_sets(model, tok, "static", [1], calibration=examples)
    best = max(range(L), key=lambda b: (scores[b], -b))
    assert sets == {1: [[best]]} and info["calibration_ids"] == [e.id for e in examples]


def test_parse_baselines():
    assert bl.parse_baselines(["shortgpt:4,1,2", "exit:2"]) == [("shortgpt", [1, 2, 4]), ("exit", [2])]
    for bad in ("prune:1", "exit", "exit:0", "exit:a"):
        with pytest.raises(ValueError):
            bl.parse_baselines([bad])
    with pytest.raises(ValueError, match="K must be in"):
        bl.exit_skips(4, 4)


# --------------------------------------------------------------------------- paired test, intervals


def explicit_bootstrap(runs: list[list[int]]) -> list[float]:
    """The 2.5 % and 97.5 % points of the mean accuracy across runs, over item resamples drawn by hand."""
    n = len(runs[0])
    draws = random.Random(BOOTSTRAP_SEED)
    means = []
    for _ in range(BOOTSTRAP_RESAMPLES):
        items = draws.choices(range(n), k=n)
        means.append(sum(sum(run[i] for i in items) / n for run in runs) / len(runs))
    means.sort()
    cut = round(0.025 * BOOTSTRAP_RESAMPLES)
    return [means[cut], means[BOOTSTRAP_RESAMPLES - 1 - cut]]


def test_seeded_interval_is_a_bootstrap_over_items_not_pooled_seeds():
    """Seeds scored on the same items are not new items: three identical seeds have one seed's interval
    (pooled as new items they had a narrower one: [0.351, 0.397] where one seed alone had [0.335, 0.414])."""
    rng = random.Random(7)
    n = 500
    one = [int(rng.random() < 0.37) for _ in range(n)]
    alone, three = seeded_accuracy([one]), seeded_accuracy([one] * 3)
    assert three["ci95"] == alone["ci95"] and three["accuracy"] == alone["accuracy"]
    wilson = wilson_interval(sum(one), n)
    assert alone["ci95"] == pytest.approx(list(wilson), abs=0.01)  # one run: about its Wilson interval
    runs = [[int(rng.random() < p) for _ in range(n)] for p in (0.3, 0.4, 0.5)]
    seeded = seeded_accuracy(runs)
    assert seeded["ci95"] == pytest.approx(explicit_bootstrap(runs), abs=1e-12)
    assert seeded == seeded_accuracy(runs) and seeded_accuracy(runs[::-1])["ci95"] == seeded["ci95"]  # seeded
    assert seeded["ci95"][0] < seeded["accuracy"] < seeded["ci95"][1]
    assert "bootstrap over items" in seeded["ci95_method"]


def test_random_row_interval_is_the_bootstrap_of_its_seeds(setup):
    """compare's random row: the mean over seeds, its interval the bootstrap over the same items, its legend
    saying so."""
    model, tok = setup
    res = compare(model, tok, arc_examples(8), baselines=[("random", [1, 2])], seeds=3)
    for row in res["methods"][1:]:
        runs = [[int(c) for c in run["items"]] for run in row["runs"]]
        assert row["ci95"] == pytest.approx(explicit_bootstrap(runs), abs=1e-12)
        assert row["accuracy"] == pytest.approx(sum(map(sum, runs)) / (3 * 8))
    legend = frontier_legend(res["methods"])
    assert "random:1: mean over 3 seeds" in legend and "bootstrap over items (2000 resamples, seed 0)" in legend


def test_equal_compute_only_where_blocks_per_pass_match():
    """The tables say "equal compute" of two rows only where their measured blocks per pass match."""
    items = "1100"
    vanilla = {"method": "vanilla", "setting": None, "accuracy": 0.5, "blocks_per_pass": 4.0, "items": items}
    fewer = {"method": "routers", "setting": 0.0, "accuracy": 0.5, "blocks_per_pass": 3.5, "items": items}
    same = {"method": "routers", "setting": -0.5, "accuracy": 0.5, "blocks_per_pass": 3.0, "items": items}
    static = {"method": "static", "setting": 1, "accuracy": 0.5, "blocks_per_pass": 3.0, "items": items}
    exit_ = {"method": "exit", "setting": 1, "accuracy": 0.5, "blocks_per_pass": 3.0, "items": items}
    methods = [vanilla, fewer, same, static, exit_]
    headers, rows = routers_vs_baselines(methods)
    assert headers[-1] == "compute (routers - baseline)"
    for row in rows:
        routers_blocks, baseline_blocks = float(row[1]), float(row[3])
        note = row[-1]
        if routers_blocks == baseline_blocks:
            assert note == "equal compute"
        else:
            assert note == f"{routers_blocks - baseline_blocks:+.2f} blocks/pass" and "equal" not in note
    assert [r[-1] for r in rows] == ["+0.50 blocks/pass"] * 2 + ["equal compute"] * 2
    legend = frontier_legend(methods)
    assert "equal compute (3.00 blocks/pass): routers λ -0.5, static:1, exit:1." in legend
    assert "no other row at the same blocks/pass: vanilla (4.00), routers λ 0 (3.50)." in legend
    assert legend.count("equal compute") == 1




def test_mcnemar_known_values():
    assert mcnemar_exact(0, 5) == pytest.approx(0.0625)
    assert mcnemar_exact(5, 0) == pytest.approx(0.0625)
    assert mcnemar_exact(1, 9) == pytest.approx(2 * 11 / 1024)
    assert mcnemar_exact(3, 3) == 1.0 and mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(0, 6) == pytest.approx(0.03125)
    scipy_stats = pytest.importorskip("scipy.stats")
    for b, c in [(2, 7), (10, 4), (0, 1), (13, 25)]:
        assert mcnemar_exact(b, c) == pytest.approx(scipy_stats.binomtest(b, b + c, 0.5).pvalue, rel=1e-12)
    t = paired_test([1, 1, 0, 0, 1], [1, 0, 1, 1, 1])
    assert (t["only_vanilla"], t["only_method"]) == (1, 2) and t["p"] == 1.0
    assert verdict({"method": "exit", "mcnemar": t}) == "no significant difference"
    assert verdict({"method": "exit", "mcnemar": {"only_vanilla": 6, "only_method": 0, "p": 0.03125}}) == \
        "worse than vanilla"


def test_routers_against_each_baseline_on_the_same_items():
    """Routers vs each baseline: McNemar on the per-item outcomes; random: its median seed, not pooled pairs."""
    routers = {"method": "routers", "setting": 0.0, "accuracy": 0.75, "blocks_per_pass": 3.5, "items": "11111100"}
    static = {"method": "static", "setting": 1, "accuracy": 0.25, "blocks_per_pass": 3.0, "items": "00000011"}
    seeds = ["11111100", "11000000", "00000000"]  # p 1, 0.125 (0/4), 0.031 (0/6): the median seed is the second
    rnd = {"method": "random", "setting": 1, "accuracy": 0.5, "blocks_per_pass": 3.0,
           "runs": [{"items": i} for i in seeds]}
    vanilla = {"method": "vanilla", "setting": None, "accuracy": 0.5, "blocks_per_pass": 4.0, "items": "11110000"}
    headers, rows = routers_vs_baselines([vanilla, routers, static, rnd])
    assert [r[2] for r in rows] == ["static:1", "random:1"]
    assert rows[0][5] == f"{mcnemar_exact(2, 6):.3g} (2/6)" and rows[0][6] == "within noise"
    assert rows[1][5] == "0.125 (0/4)" and rows[1][4] == "+0.250" and rows[1][6] == "within noise"
    lopsided = {**static, "items": "00000000"}
    routers6 = {**routers, "items": "11111111"}
    assert routers_vs_baselines([vanilla, routers6, lopsided])[1][0][6] == "routers above"  # 8/0: p 0.0078


# --------------------------------------------------------------------------- the command


def write_arc(folder, split, examples):
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f"{split}.jsonl", "w") as f:
        for ex in examples:
            f.write(json.dumps({"id": ex.id, "question": {"stem": ex.question, "choices": [
                {"text": t, "label": lab} for t, lab in zip(ex.choices, ex.labels)]}, "answerKey": ex.answer}) + "\n")


@pytest.fixture(scope="module")
def saved(setup, tmp_path_factory):
    """The tiny model, tokenizer and routers on disk, and ARC files: train q0..q7, validation q8..q11."""
    model, tok = setup
    root = tmp_path_factory.mktemp("baselines")
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    decisive_routers(model, tok).save_pretrained(root / "routers")
    examples = arc_examples(12)
    write_arc(root / "data" / "arc_easy", "train", examples[:8])
    write_arc(root / "data" / "arc_easy", "validation", examples[8:])
    return root


def run_eval(root, *extra, routers=True):
    from drllm.cli import main

    with_routers = ["--routers", str(root / "routers")] if routers else []
    return main(["eval", "--model", str(root / "model"), "--device", "cpu", *with_routers,
                 "--task", "arc_easy", "--data-dir", str(root / "data"), "--batch-size", "4", *extra])


def test_eval_command_json_table_and_plot(saved, setup, tmp_path, capsys):
    model, tok = setup
    out_json = tmp_path / "out.json"
    rc = run_eval(saved, "--split", "validation", "--baselines", "shortgpt:1,2", "static:1", "random:1",
                  "exit:1,2", "--lam", "-0.5", "0", "--calib-n", "5", "--out-dir", str(tmp_path / "figs"),
                  "--json", str(out_json))
    assert rc == 0
    printed = capsys.readouterr().out
    payload = json.loads(out_json.read_text())
    methods = payload["methods"]
    assert [(m["method"], m["setting"]) for m in methods] == [
        ("vanilla", None), ("routers", -0.5), ("routers", 0.0), ("shortgpt", 1), ("shortgpt", 2), ("static", 1),
        ("static-resampled", 1), ("random", 1), ("exit", 1), ("exit", 2)]  # --resamples 3 by default
    for m in methods:
        assert {"method", "setting", "accuracy", "ci95", "blocks_per_pass", "n", "mcnemar"} <= set(m)
        assert m["n"] == 4 and m["ci95"][0] <= m["accuracy"] <= m["ci95"][1]
        assert set(m["mcnemar"]) == {"only_vanilla", "only_method", "p"}
        if m["method"] in ("shortgpt", "static", "exit"):
            assert len(m["skipped"]) == m["setting"] and m["blocks_per_pass"] == L - m["setting"]
    vanilla = methods[0]
    assert vanilla["blocks_per_pass"] == L and vanilla["mcnemar"]["p"] == 1.0
    assert methods[2]["accuracy"] == payload["results"][1]["routed"]["accuracy"]
    rnd = methods[7]
    assert len(rnd["runs"]) == 5 and rnd["skipped"] == [bl.random_skips(L, 1, s) for s in range(5)]
    assert rnd["accuracy"] == pytest.approx(sum(r["accuracy"] for r in rnd["runs"]) / 5)
    assert rnd["spread"]["min"] <= rnd["accuracy"] <= rnd["spread"]["max"]
    # the exit row is the forced path evaluated directly on the same items
    from drllm.tasks import load_task

    items = load_task("arc_easy", "validation", data_dir=saved / "data")
    direct = evaluate_path(model, tok, items, skip_set_path(L, [L - 1]), batch_size=4)
    assert methods[8]["correct"] == sum(r["correct"] for r in direct)
    assert payload["baselines"]["shortgpt"]["calibration_ids"] == [f"q{i}" for i in range(5)]
    assert len(payload["baselines"]["shortgpt"]["block_influence"]) == L
    assert "no significant difference" in printed and "McNemar" in printed
    assert "first 5 arc_easy train items" in printed
    assert (tmp_path / "figs" / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table, legend = (tmp_path / "figs" / "frontier.md").read_text().split("\n\n")
    assert table.count("\n") == len(methods) + 1 and legend in printed


def record_dev_part(root, dev_ids, task="arc_easy", lam=-0.25):
    """The ``selection.json`` that ``drllm train`` writes beside the routers, reduced to what eval reads
    (``task`` None: as an older drllm wrote it, without the task)."""
    (root / "routers" / "selection.json").write_text(json.dumps(
        {"min_margin": 0.2, "lam": lam, "epoch": 3, "dev_ids": dev_ids, "dev": len(dev_ids), "rule": "highest",
         **({} if task is None else {"task": task}),
         "dev_vanilla": {"accuracy": 0.5, "ci95": [0.1, 0.9], "n": len(dev_ids)},
         "scored": [{"min_margin": 0.2, "lam": -0.25, "epoch": 3, "accuracy": 0.625, "ci95": [0.3, 0.86],
                     "blocks_per_pass": 3.5}]}))


def test_no_evaluated_item_reaches_calibration_or_selection(saved, monkeypatch, capsys):
    """Evaluate train items themselves: calibration and selection still never see them."""
    seen = []
    influence, scorer = bl.block_influence, bl.accuracy_scorer

    def spy(real):
        def wrapped(model, tok, examples, **kw):
            seen.extend(e.id for e in examples)
            return real(model, tok, examples, **kw)
        return wrapped

    monkeypatch.setattr(bl, "block_influence", spy(influence))
    monkeypatch.setattr(bl, "accuracy_scorer", spy(scorer))
    assert run_eval(saved, "--split", "train", "--n", "3", "--baselines", "shortgpt:1", "static:1",
                    "--calib-n", "4") == 0
    assert seen and set(seen) == {"q3", "q4", "q5", "q6"}  # train items, none of the evaluated q0..q2
    # a recorded dev part that holds an evaluated item is refused, in one line
    record_dev_part(saved, ["q1", "q5"])
    capsys.readouterr()
    try:
        assert run_eval(saved, "--split", "train", "--n", "3", "--baselines", "static:1") == 2
    finally:
        (saved / "routers" / "selection.json").unlink()
    err = capsys.readouterr().err.splitlines()[-1]
    assert err.startswith("drllm eval: error: 1 calibration/selection items are also evaluated")


def test_compare_refuses_overlap_and_uses_recorded_dev_part(setup, saved):
    model, tok = setup
    examples = arc_examples(3)
    with pytest.raises(ValueError, match="also evaluated"):
        compare(model, tok, examples, baselines=[("shortgpt", [1])], calibration=arc_examples(4)[2:])
    record_dev_part(saved, ["q6", "q2"])
    try:
        items, source = bl.calibration_set("arc_easy", examples[:1], n=5,
                                           dev_ids=read_selection(saved / "routers")["dev_ids"],
                                           data_dir=saved / "data")
    finally:
        (saved / "routers" / "selection.json").unlink()
    assert [e.id for e in items] == ["q2", "q6"] and "recorded with the routers" in source
    res = compare(model, tok, examples, baselines=[("exit", [1])])
    assert [m["method"] for m in res["methods"]] == ["vanilla", "exit"] and res["sweep"] == []
    assert math.isclose(res["methods"][1]["blocks_per_pass"], L - 1)


def test_eval_command_without_routers(saved, tmp_path):
    out_json = tmp_path / "out.json"
    assert run_eval(saved, "--split", "validation", "--baselines", "exit:1", "--json", str(out_json),
                    routers=False) == 0
    payload = json.loads(out_json.read_text())
    assert [m["method"] for m in payload["methods"]] == ["vanilla", "exit"] and payload["results"] == []


def test_eval_command_prints_the_routers_selection(saved, tmp_path, capsys):
    """The knobs drllm train chose, with the dev figures they were chosen on, are printed and kept in the JSON;
    the static selection uses that dev part."""
    record_dev_part(saved, ["q5", "q6"])
    out_json = tmp_path / "out.json"
    try:
        assert run_eval(saved, "--split", "validation", "--baselines", "static:1", "--json", str(out_json)) == 0
    finally:
        (saved / "routers" / "selection.json").unlink()
    printed = capsys.readouterr().out
    assert "routers: chosen on 2 dev items: min_margin 0.2, lambda -0.25, epoch 3" in printed
    assert "0.625 [0.300, 0.860]" in printed and "dev part recorded with the routers (2 arc_easy" in printed
    assert "routers vs baseline" in printed  # the routers against each baseline, paired
    payload = json.loads(out_json.read_text())
    assert payload["selection"]["lam"] == -0.25 and payload["baselines"]["static"]["calibration_ids"] == ["q5", "q6"]



def test_eval_routes_at_the_lambda_drllm_train_chose(saved, setup, tmp_path, capsys):
    """Without --lam, eval evaluates the routers at selection.json's λ (it printed it, then evaluated 0);
    --lam given wins."""
    model, tok = setup
    record_dev_part(saved, ["q5", "q6"], lam=-1.0)  # λ -1 skips every block: no other λ gives 0 blocks per pass
    try:
        assert run_eval(saved, "--split", "validation", "--json", str(tmp_path / "chosen.json")) == 0
        chosen_out = capsys.readouterr().out
        assert run_eval(saved, "--split", "validation", "--lam", "0.5", "--json", str(tmp_path / "given.json")) == 0
        given_out = capsys.readouterr().out
    finally:
        (saved / "routers" / "selection.json").unlink()
    chosen = json.loads((tmp_path / "chosen.json").read_text())
    assert [r["lam"] for r in chosen["results"]] == [-1.0]
    routers_row = chosen["methods"][1]
    assert (routers_row["method"], routers_row["setting"], routers_row["blocks_per_pass"]) == ("routers", -1.0, 0.0)
    assert "lambda -1" in chosen_out and "routers evaluated at λ -1 (chosen by drllm train)" in chosen_out
    from drllm.tasks import load_task

    items = load_task("arc_easy", "validation", data_dir=saved / "data")
    direct = evaluate(model, tok, drllm.Routers.from_pretrained(saved / "routers"), items, lam=-1.0, batch_size=4)
    assert chosen["results"][0]["decisions"] == direct["decisions"]
    assert routers_row["correct"] == direct["routed"]["correct"]
    given = json.loads((tmp_path / "given.json").read_text())
    assert [r["lam"] for r in given["results"]] == [0.5] and given["methods"][1]["setting"] == 0.5
    assert "routers evaluated at λ 0.5 (given on the command line)" in given_out


def test_eval_out_of_domain_calibrates_on_the_routers_own_dev_part(saved, tmp_path, capsys):
    """ARC-Easy routers evaluated on ARC-Challenge: shortgpt/static calibrate on the routers' dev part, ARC-Easy
    train items (they were looked up in ARC-Challenge's train split: a traceback). An older selection.json, which
    does not name its task, is a one-line error that says what to do."""
    challenge = [replace(e, id=f"c{i}", task="arc_challenge") for i, e in enumerate(arc_examples(12))]
    write_arc(saved / "data" / "arc_challenge", "train", challenge[:8])
    write_arc(saved / "data" / "arc_challenge", "validation", challenge[8:])
    argv = ("--task", "arc_challenge", "--split", "validation", "--baselines", "shortgpt:1", "static:1")
    try:
        record_dev_part(saved, ["q5", "q6"])
        assert run_eval(saved, *argv, "--json", str(tmp_path / "out.json")) == 0
        printed = capsys.readouterr().out
        record_dev_part(saved, ["q5", "q6"], task=None)
        assert run_eval(saved, *argv) == 2
        err = capsys.readouterr().err
    finally:
        (saved / "routers" / "selection.json").unlink()
        shutil.rmtree(saved / "data" / "arc_challenge")
    payload = json.loads((tmp_path / "out.json").read_text())
    assert payload["methods"][0]["n"] == 4 and payload["task"] == "arc_challenge"
    for method in ("shortgpt", "static"):
        assert payload["baselines"][method]["calibration_ids"] == ["q5", "q6"]
    assert "dev part recorded with the routers (2 arc_easy train items)" in printed
    line = err.splitlines()[-1]
    assert err.endswith(line + "\n") and line.startswith("drllm eval: error: ")
    assert "selection.json does not say which task" in line and 'add "task": "arc_easy"' in line


@pytest.mark.parametrize("baseline, needle", [
    ("exit:4", "exit can drop 1 to 3; K 4 cannot be dropped"),
    ("random:2,4", "random can drop 1 to 3 with at most 2 consecutive skips; K 4 cannot be dropped"),
])
def test_eval_refuses_a_k_the_model_cannot_drop_in_one_line(saved, capsys, baseline, needle):
    capsys.readouterr()
    assert run_eval(saved, "--split", "validation", "--baselines", baseline, routers=False) == 2
    err = capsys.readouterr().err.splitlines()[-1]
    assert err.startswith("drllm eval: error: baseline ") and needle in err
