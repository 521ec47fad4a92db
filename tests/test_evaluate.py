"""Evaluation: figures equal a manual computation; lambda extremes; plots; the eval command.

Baselines, the paired test and the frontier plot: tests/test_baselines.py."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import tiny_model
from tiny_tokenizer import make_tiny_tokenizer

import drllm
from drllm.eval.scoring import evaluate, evaluate_path, lam_sweep, score_paths
from drllm.eval.stats import wilson_interval
from drllm.tasks import Example, cloze_requests, encode_request, generation_prompt

# Tiny models are all per-op overhead: one intra-op thread is faster (far faster on a busy machine).
pytestmark = pytest.mark.usefixtures("one_thread")

L = 4


def arc_examples(n: int = 6) -> list[Example]:
    out = []
    for i in range(n):
        k = 3 + i % 2
        choices = tuple(f"choice {chr(97 + j)}{'x' * (i + j)}" for j in range(k))
        gold = i % k
        out.append(Example(id=f"q{i}", task="arc_easy", question=f"What is {i} plus {i * 7 % 5}? {'z' * i}",
                           answer="ABCD"[gold], choices=choices, labels=tuple("ABCD"[:k]), gold_index=gold))
    return out


def decisive_routers(model, tok, seed=0, scale=30.0):
    """Random routers with sharp, centred logits, so decisions differ between prompts and blocks."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        routers = drllm.Routers.for_model(model, num_windows=4)
    texts = [cloze_requests(e, tok)[0] for e in arc_examples(8)]
    batch = tok(texts, return_tensors="pt", padding=True)
    states = drllm.block_states(model, **batch)
    with torch.no_grad():
        for i, mlp in enumerate(routers.mlps):
            mlp.fc2.weight.mul_(scale)
            logits = routers.logits(i, states[i], batch["attention_mask"])
            mlp.fc2.bias.sub_(logits.mean(0))  # centred on these prompts: the sign of the deviation decides
    return routers


@pytest.fixture(scope="module")
def setup(one_thread):
    model = tiny_model("llama", seed=5, num_layers=L)
    tok = make_tiny_tokenizer(chat_template=False)
    return model, tok, decisive_routers(model, tok)


def manual_loglik(model, tok, examples, routed: bool):
    """Each choice alone (batch 1), scored by hand: (correct, path, layers) per example."""
    out = []
    for ex in examples:
        ctx_text, conts = cloze_requests(ex, tok)
        scores, paths = [], []
        for j, cont_text in enumerate(conts):
            ctx, cont = encode_request(tok, ctx_text, cont_text)
            ids = torch.tensor([(ctx + cont)[:-1]])
            kw = {"routing_mask": torch.tensor([[1] * len(ctx) + [0] * (len(cont) - 1)])} if routed else {}
            with torch.no_grad():
                logits = model(input_ids=ids, **kw).logits[0]
            paths.append(drllm.last_paths(model)[0] if routed else torch.ones(L, dtype=torch.long))
            lp = logits[len(ctx) - 1 : len(ctx) - 1 + len(cont)].log_softmax(-1)
            total = float(lp.gather(-1, torch.tensor(cont)[:, None]).sum())
            scores.append(total / len(ex.choices[j]))
        choice = max(range(len(scores)), key=lambda j: (scores[j], -j))
        out.append((int(choice == ex.gold_index), paths[0], int(sum(int(p.sum()) for p in paths))))
    return out


def test_wilson_interval_known_values():
    lo, hi = wilson_interval(8, 10)
    assert (round(lo, 4), round(hi, 4)) == (0.4902, 0.9433)
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == pytest.approx(1.0)
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_loglik_figures_equal_manual_computation(setup):
    model, tok, routers = setup
    examples = arc_examples(6)
    vanilla = manual_loglik(model, tok, examples, routed=False)
    drllm.patch(model, routers)
    try:
        routed = manual_loglik(model, tok, examples, routed=True)
    finally:
        drllm.unpatch(model)
    res = evaluate(model, tok, routers, examples, batch_size=5)
    assert not drllm.is_patched(model)
    n = len(examples)
    for name, manual in (("vanilla", vanilla), ("routed", routed)):
        s = res[name]
        k = sum(c for c, _, _ in manual)
        assert s["correct"] == k and s["accuracy"] == pytest.approx(k / n)
        assert s["ci95"] == pytest.approx(list(wilson_interval(k, n)))
        assert s["mean_path_length"] == pytest.approx(sum(int(p.sum()) for _, p, _ in manual) / n)
        assert s["layers_per_example"] == pytest.approx(sum(lay for _, _, lay in manual) / n)
    assert res["vanilla"]["layers_per_example"] == pytest.approx(L * sum(len(e.choices) for e in examples) / n)
    assert res["decisions"] == ["".join(map(str, p.tolist())) for _, p, _ in routed]
    assert len(set(res["decisions"])) > 1, "routers should take different paths on different prompts"
    assert res["routed"]["inconsistent_paths"] == 0
    d = res["difference"]
    assert d["accuracy"] == pytest.approx(res["routed"]["accuracy"] - res["vanilla"]["accuracy"])
    assert d["layers_per_example"] == pytest.approx(res["routed"]["layers_per_example"] - L * 3.5)
    assert d["both_correct"] + d["only_vanilla"] + d["only_routed"] + d["neither"] == n
    counts = res["routed"]["decision_counts"]
    assert sum(counts.values()) == n * L
    # batching does not change a row's result
    one = evaluate(model, tok, routers, examples, batch_size=1)
    assert one["decisions"] == res["decisions"] and one["routed"]["correct"] == res["routed"]["correct"]
    json.dumps(res)  # serialisable


def test_generation_figures_equal_manual_computation(setup):
    model, tok, routers = setup
    examples = arc_examples(5)
    res = evaluate(model, tok, routers, examples, reward="generate", batch_size=3, max_new_tokens=4)
    drllm.patch(model, routers)
    try:
        layers, paths = [], []
        for ex in examples:
            ids = torch.tensor([tok(generation_prompt(ex, tok, style="auto"))["input_ids"]])
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4,
                                 do_sample=False, pad_token_id=0)
            path = drllm.last_paths(model)[0]
            new = out[0, ids.shape[1]:].tolist()
            n_new = new.index(0) if 0 in new else len(new)  # pad 0 ends a row (the tiny model has no eos)
            paths.append("".join(map(str, path.tolist())))
            layers.append(int(path.sum()) * max(n_new, 1))
    finally:
        drllm.unpatch(model)
    assert res["decisions"] == paths
    assert res["routed"]["layers_per_example"] == pytest.approx(sum(layers) / len(layers))
    passes = [e["routed_row"]["passes"] for e in res["examples"]]
    assert res["vanilla"]["layers_per_example"] == pytest.approx(
        L * sum(e["vanilla_row"]["passes"] for e in res["examples"]) / len(examples))
    assert all(1 <= p <= 4 for p in passes)


def test_score_paths_equals_one_path_at_a_time(setup):
    """Every path of an item in one pass (prefix reuse, packed choices) scores as each path alone."""
    model, tok, _ = setup
    examples = arc_examples(6)
    paths = ["1111", "0111", "1011", "1101", "1110", "1001", "0110", "1121", "2111", "0000"]
    together = score_paths(model, tok, examples, paths, max_paths=3)  # several calls per item
    assert len(together) == len(paths)
    margins = []
    for path, rows in zip(paths, together):
        alone = evaluate_path(model, tok, examples, path, batch_size=4)
        assert [r["correct"] for r in rows] == [r["correct"] for r in alone]
        assert [r["choice"] for r in rows] == [r["choice"] for r in alone]
        assert [r["margin"] for r in rows] == pytest.approx([r["margin"] for r in alone], abs=1e-5)
        assert [(r["path"], r["layers"], r["passes"]) for r in rows] == [(r["path"], r["layers"], r["passes"])
                                                                         for r in alone]
        margins.append(tuple(round(r["margin"], 4) for r in rows))
    assert len(set(margins)) == len(paths)  # the paths really differ, so equal rows are not a coincidence


def test_lambda_extremes_and_sweep(setup):
    model, tok, routers = setup
    examples = arc_examples(3)
    results = lam_sweep(model, tok, routers, examples, [-1.0, 0.0, 1.0], batch_size=8)
    lo, mid, hi = results
    assert lo["routed"]["mean_path_length"] == 0 and lo["routed"]["layers_per_example"] == 0
    assert hi["routed"]["mean_path_length"] == 2 * L
    assert hi["routed"]["layers_per_example"] == pytest.approx(2 * L * 10 / 3)  # 3 + 4 + 3 choices
    assert lo["vanilla"] == mid["vanilla"] == hi["vanilla"]  # scored once, reused


def test_plots_and_eval_command(setup, tmp_path):
    model, tok, routers = setup
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    routers.save_pretrained(tmp_path / "routers")
    data = tmp_path / "data" / "arc_easy"
    data.mkdir(parents=True)
    with open(data / "validation.jsonl", "w") as f:
        for ex in arc_examples(4):
            f.write(json.dumps({"id": ex.id, "question": {"stem": ex.question, "choices": [
                {"text": t, "label": lab} for t, lab in zip(ex.choices, ex.labels)]}, "answerKey": ex.answer}) + "\n")
    from drllm.cli import main

    out_json = tmp_path / "eval.json"
    rc = main(["eval", "--model", str(tmp_path / "model"), "--device", "cpu", "--routers", str(tmp_path / "routers"),
               "--task", "arc_easy", "--split", "validation", "--n", "3", "--data-dir", str(tmp_path / "data"),
               "--lam", "-0.5", "0", "0.5", "--out-dir", str(tmp_path / "figs"), "--json", str(out_json),
               "--batch-size", "4"])
    assert rc == 0
    payload = json.loads(out_json.read_text())
    assert [r["lam"] for r in payload["results"]] == [-0.5, 0.0, 0.5]
    assert payload["results"][0]["n"] == 3
    names = sorted(p.name for p in (tmp_path / "figs").iterdir())
    assert "frontier.png" in names and "frontier.md" in names
    assert "decisions_heatmap_lam+0.png" in names and "decisions_histogram_lam-0.5.png" in names
    for name in names:
        if name.endswith(".png"):
            assert (tmp_path / "figs" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # same figures as the library on the same examples
    from drllm.tasks import load_task

    direct = evaluate(model, tok, routers, load_task("arc_easy", "validation", data_dir=tmp_path / "data", limit=3),
                      batch_size=4)
    assert payload["results"][1]["routed"]["accuracy"] == direct["routed"]["accuracy"]
    assert payload["results"][1]["decisions"] == direct["decisions"]
