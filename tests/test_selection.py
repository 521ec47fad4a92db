"""Choosing the knobs without leakage: records that carry what training reads, the train/dev split, the thin-label
rule, dev-only selection, no validation item in training, exact resume of a selection."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import tiny_model
from tiny_tokenizer import make_tiny_tokenizer

import drllm
import drllm.train as train
from drllm.eval import budget_selection, selection
from drllm.search import SearchConfig, run_search, shared_skip
from drllm.tasks import cloze_context, encode_request, load_task
from drllm.train import loop

pytestmark = pytest.mark.usefixtures("one_thread")

L = 4


@pytest.fixture(scope="module")
def searched(tmp_path_factory, one_thread):
    """A tiny model, its tokenizer, 12 ARC-Easy train items searched into a records file, 6 validation items."""
    model, tok = tiny_model("llama", seed=3, num_layers=L), make_tiny_tokenizer()
    items = load_task("arc_easy", "train", limit=12)
    val = load_task("arc_easy", "validation", limit=6)
    paths = tmp_path_factory.mktemp("search") / "paths.jsonl"
    run_search(model, tok, items, paths, config=SearchConfig(simulations=4, seed=0), progress=False)
    return model, tok, items, val, paths


def _records(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _cfg(tmp_path, **kw):
    return train.TrainConfig(**{"epochs": 3, "batch_size": 4, "progress": False, "min_block_labels": 0,
                                "cache_dir": str(tmp_path / "cache"), **kw})


def test_public_api_is_the_package():
    for name in train.__all__:
        assert getattr(train, name) is not None, name
    assert train.train_routers is loop.train_routers
    assert {"TrainConfig", "train_routers", "label_path", "trusted_labels",
            "load_path_records", "extract_features", "focal_loss", "class_weights"} <= set(train.__all__)
    # choosing the knobs scores candidates on dev: evaluation's, above training (train never imports eval)
    assert {"select_routers", "read_selection", "LAMS", "MARGINS", "SELECTION_NAME"} <= set(selection.__all__)
    assert not {"select_routers", "read_selection", "LAMS", "MARGINS", "SELECTION_NAME"} & set(train.__all__)


def test_search_records_carry_the_routing_tokens_and_the_item(searched):
    model, tok, items, _, paths = searched
    by_id = {e.id: e for e in items}
    for rec in _records(paths):
        ex = by_id[rec["id"]]
        ctx, _ = encode_request(tok, cloze_context(ex), " " + ex.choices[0])  # what scoring reads
        assert rec["routing_tokens"] == ctx == train.record_tokens(rec, tok)
        assert train.record_example(rec) == ex
        old = {k: v for k, v in rec.items() if k not in ("routing_tokens", "example")}  # an older drllm's record
        assert train.record_tokens(old, tok) == ctx  # encoded from the prompt by the same encoder
        assert train.record_example(old, by_id) == ex
        with pytest.raises(ValueError, match="carries no 'example'.*search again"):
            train.record_example(old)


def test_training_reads_the_tokens_the_record_points_to(searched, tmp_path, monkeypatch):
    model, tok, _, _, paths = searched
    planted = [{**r, "routing_tokens": r["routing_tokens"][::-1]} for r in _records(paths)]
    f = _write(tmp_path / "planted.jsonl", planted)
    seen = []
    real = loop.cached_features
    monkeypatch.setattr(loop, "cached_features", lambda *a, **k: seen.append(a[3]) or real(*a, **k))
    train.train_routers(model, tok, f, tmp_path / "r", config=_cfg(tmp_path, epochs=1))
    assert [list(t) for t in seen[0]] == [r["routing_tokens"] for r in planted]
    _write(f, [{**planted[0], "routing_tokens": [-1]}] + planted[1:])
    with pytest.raises(ValueError, match="'routing_tokens' must be a non-empty list of token ids"):
        train.train_routers(model, tok, f, tmp_path / "r", config=_cfg(tmp_path, epochs=1))


def test_thin_decisions_are_taught_as_execute_by_hand():
    labels = torch.tensor([[0, 1, 2], [0, 1, 1], [0, 2, 1], [1, 1, 2]])
    # train part: rows 0-2. Block 0 skip x3, block 1 repeat x1, block 2 repeat x1; row 3 (dev) follows the train counts
    kept, dropped = train.trusted_labels(labels, [0, 1, 2], min_count=2)
    assert kept.tolist() == [[0, 1, 1], [0, 1, 1], [0, 1, 1], [1, 1, 1]] and dropped == 2
    assert torch.equal(train.trusted_labels(labels, [0, 1, 2], 1)[0], labels)  # 1 (or 0) keeps every label
    assert train.trusted_labels(labels, [0, 1, 2], 4)[0].eq(1).all()


def test_two_items_do_not_make_a_skip_everywhere_rule(searched, tmp_path):
    model, tok, _, _, paths = searched
    records = _records(paths)
    for i, r in enumerate(records):  # two items teach skipping block 0, the rest the default path
        path = "0111" if i < 2 else "1111"
        r.update(best_path=path, best_margin=1.0, best_length=sum(map(int, path)),
                 good_paths=[{"path": path, "reward": 1, "margin": 1.0, "length": sum(map(int, path))}])
    f = _write(tmp_path / "two.jsonl", records)
    cfg = dict(dev_fraction=0.0, epochs=15, lr=1e-2)
    loose = train.train_routers(model, tok, f, tmp_path / "loose", config=_cfg(tmp_path, min_block_labels=0, **cfg))
    assert loose["class_counts"]["skip"] == 2 and loose["class_weights"]["skip"] > 5 * loose["class_weights"]["execute"]
    strict = train.train_routers(model, tok, f, tmp_path / "strict", config=_cfg(tmp_path, min_block_labels=3, **cfg))
    assert strict["class_counts"]["skip"] == 0 and strict["thin_labels"] == 1 and strict["default_labels"] == 12

    def decisions(folder) -> list[list[int]]:
        drllm.patch(model, drllm.Routers.from_pretrained(folder))
        paths = []
        try:
            for r in records:
                model(input_ids=torch.tensor([r["routing_tokens"]]), use_cache=False)
                paths.append(drllm.last_paths(model)[0].tolist())
            return paths
        finally:
            drllm.unpatch(model)

    assert sum(p[0] == 0 for p in decisions(tmp_path / "loose")) >= 10  # what two items taught, applied to all
    assert all(p == [1] * L for p in decisions(tmp_path / "strict"))


def test_shared_skip_reads_the_train_part_only(searched, tmp_path):
    model, tok, _, _, paths = searched
    records = _records(paths)
    train_idx, dev_idx = train.split_dev(len(records), 0.25, 0)
    assert (train_idx, dev_idx) == train.split_dev(len(records), 0.25, 0) and len(dev_idx) == 3
    assert train.split_dev(len(records), 0.25, 1) != (train_idx, dev_idx)  # seeded
    dev_ids = {records[i]["id"] for i in dev_idx}
    # two train items gain from skipping block 1; the three dev items would gain from skipping block 2
    gains_1 = {records[i]["id"] for i in train_idx[:2]}
    probes = [{"id": r["id"], "num_blocks": L, "default_margin": -0.1,
               "skip_margins": [-0.2, 0.1 if r["id"] in gains_1 else -0.2, 0.3 if r["id"] in dev_ids else -0.2, -0.2]}
              for r in records]
    assert shared_skip(probes) == 2  # what all probes together pick
    skips = _write(tmp_path / "skips.jsonl", probes)
    result = train.train_routers(model, tok, paths, tmp_path / "r", skips_file=skips,
                                 config=_cfg(tmp_path, epochs=1, dev_fraction=0.25))
    assert set(result["dev_ids"]) == dev_ids and result["shared_skip"] == 1


def _tiny_data(tmp_path, train_n=10, val_n=6) -> Path:
    from drllm.tasks.data import EMBEDDED_DIR

    for task, split, n in (("arc_easy", "train", train_n), ("arc_easy", "validation", val_n),
                           ("arc_challenge", "validation", val_n)):  # the demo's out-of-domain split too
        lines = (EMBEDDED_DIR / task / f"{split}.jsonl").read_text().splitlines()[:n]
        (tmp_path / "data" / task).mkdir(parents=True, exist_ok=True)
        (tmp_path / "data" / task / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return tmp_path / "data"


def test_no_validation_item_reaches_training_or_selection(searched, tmp_path, monkeypatch):
    from drllm.demo import DemoSettings, run_demo

    model, tok, _, _, _ = searched
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    data = _tiny_data(tmp_path)
    train_ids = {e.id for e in load_task("arc_easy", "train", data_dir=data)}
    val_ids = {e.id for task in ("arc_easy", "arc_challenge") for e in load_task(task, "validation", data_dir=data)}
    assert train_ids and val_ids and not train_ids & val_ids
    featured, scored = set(), set()
    real_tokens, real_eval = loop.record_tokens, selection.evaluate

    def evaluate(model, tokenizer, routers, items, **kwargs):
        scored.update(e.id for e in items)
        return real_eval(model, tokenizer, routers, items, **kwargs)

    monkeypatch.setattr(loop, "record_tokens", lambda rec, t: featured.add(rec["id"]) or real_tokens(rec, t))
    monkeypatch.setattr(selection, "evaluate", evaluate)
    damaged, real_damage = set(), budget_selection.measure_damage  # the budget routers' items

    def measure_damage(model, tokenizer, items, *args, **kwargs):
        damaged.update(e.id for e in items)
        return real_damage(model, tokenizer, items, *args, **kwargs)

    monkeypatch.setattr(budget_selection, "measure_damage", measure_damage)
    summary = run_demo(tmp_path / "demo", DemoSettings(n_search=10, simulations=4, n_eval=6, epochs=2,
                                                       vocabulary_items=4),
                       model_name=str(tmp_path / "model"), data_dir=str(data), device="cpu", progress=False)
    assert summary["n_eval"] == 6  # validation was scored, by the demo, after training
    assert featured == train_ids and scored == set(summary["selection"]["dev_ids"])
    assert scored and scored < train_ids and not (featured | scored) & val_ids
    # budget routers: damage measured on the searched items only (train and dev part), budgets a 4-block model serves
    assert damaged == train_ids and summary["budget"]["budgets"] == [1, 2]


def test_knobs_are_chosen_on_dev_where_validation_disagrees(searched, tmp_path, monkeypatch):
    model, tok, items, val, paths = searched
    # planted figures: dev items favour min_margin 0.4 and lambda -0.25, validation items 0.1 and +0.25
    dev_margin, dev_lam = {0.1: 0.2, 0.2: 0.3, 0.4: 0.6}, {-0.25: 0.3, 0.0: 0.0, 0.25: 0.1}
    val_margin, val_lam = {0.1: 0.6, 0.2: 0.3, 0.4: 0.0}, {-0.25: 0.0, 0.0: 0.1, 0.25: 0.3}
    val_ids = {e.id for e in val}
    seen = set()

    def planted(m, t, routers, examples, *, lam, **kw):
        margin = float(routers.source.split("-")[1])
        seen.update(e.id for e in examples)
        acc = sum((val_margin[margin] + val_lam[lam]) if e.id in val_ids else (dev_margin[margin] + dev_lam[lam])
                  for e in examples) / len(examples)
        figures = {"accuracy": acc, "ci95": [0.0, 1.0], "mean_path_length": float(L), "n": len(examples)}
        return {"routed": figures, "vanilla": {**figures, "accuracy": 0.25}}

    class Tagged(drllm.Routers):
        @staticmethod
        def from_pretrained(path):
            routers = drllm.Routers.from_pretrained(path)
            routers.source = Path(path).name
            return routers

    monkeypatch.setattr(selection, "evaluate", planted)
    monkeypatch.setattr(selection, "Routers", Tagged)
    every_item = {e.id: e for e in list(items) + list(val)}  # validation items within reach: never used
    chosen = selection.select_routers(model, tok, paths, tmp_path / "routers", config=_cfg(tmp_path, epochs=1),
                                  examples=every_item)
    assert (chosen["min_margin"], chosen["lam"]) == (0.4, -0.25)
    assert seen == set(chosen["dev_ids"]) and not seen & val_ids
    written = selection.read_selection(tmp_path / "routers")
    assert written == {k: v for k, v in chosen.items() if k != "run"}
    assert [(e["min_margin"], e["lam"], round(e["accuracy"], 6)) for e in written["scored"]] == [
        (0.1, 0.0, 0.2), (0.2, 0.0, 0.3), (0.4, 0.0, 0.6), (0.4, -0.25, 0.9), (0.4, 0.25, 0.7)]
    assert written["dev_vanilla"]["accuracy"] == 0.25 and written["dev"] == len(written["dev_ids"]) == 2
    # the task of the dev part: eval calibrates baselines on its train split whatever task it evaluates
    assert written["task"] == "arc_easy" == items[0].task
    assert selection.routers_dev_part(written, tmp_path / "routers") == ("arc_easy", written["dev_ids"])
    assert selection.routing_knobs(written) == {"lam": (-0.25, "chosen by drllm train"),
                                                "budget": (None, "the default: selection.json chose none")}


def test_an_interrupted_selection_resumes_to_the_same_choice(searched, tmp_path):
    model, tok, items, _, paths = searched
    cfg = _cfg(tmp_path, epochs=2, dev_fraction=0.25)
    full = selection.select_routers(model, tok, paths, tmp_path / "full", config=cfg, margins=(0.0, 0.3),
                                    lams=(0.0, -0.5))
    calls = []

    def stop(epoch, entry):
        calls.append(epoch)
        if len(calls) == 3:  # the second candidate's first epoch
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        selection.select_routers(model, tok, paths, tmp_path / "part", config=cfg, margins=(0.0, 0.3), lams=(0.0, -0.5),
                             callback=stop)
    assert not (tmp_path / "part" / "selection.json").exists()
    part = selection.select_routers(model, tok, paths, tmp_path / "part", config=replace(cfg), margins=(0.0, 0.3),
                                lams=(0.0, -0.5))
    assert selection.read_selection(tmp_path / "part") == selection.read_selection(tmp_path / "full")
    a = drllm.Routers.from_pretrained(tmp_path / "full").state_dict()
    b = drllm.Routers.from_pretrained(tmp_path / "part").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert len(full["scored"]) == 3 and full["dev"] == 3
