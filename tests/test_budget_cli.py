"""Budget routers on the command line: ``drllm train --budget``, ``drllm eval --routers DIR --budgets``,
``drllm generate --budget`` and their one-line refusals, on a tiny 6-block model and the embedded ARC-Easy items."""

from __future__ import annotations

import contextlib
import io
import json
import sys

import pytest
from conftest import tiny_model
from test_cli import budget_routers, no_model_no_hub, run_cli, saved_routers  # noqa: F401 (shared)

import drllm
from drllm.cli import main
from drllm.eval.report import budget_selection_lines, format_table, routers_vs_baselines
from drllm.eval.scoring import score_paths
from drllm.eval.selection import read_selection, routing_knobs
from drllm.models import load_model
from drllm.tasks import load_task

pytestmark = pytest.mark.usefixtures("one_thread")

L = 6
SEED = 3
# a train run small enough for a test: 12 items (10 train, 2 dev), budgets 1 and 2, the tap at block 1
TRAIN = ["--n", "12", "--budgets", "1,2", "--tap", "1", "--vocabulary-size", "2", "--vocabulary-items", "8",
         "--allowed", "4", "--epochs", "5", "--no-progress"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tok):
    """A saved 6-block tiny model and its tokenizer (what ``--model`` loads)."""
    folder = tmp_path_factory.mktemp("tiny") / "model"
    tiny_model("llama", seed=SEED, num_layers=L).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def offline(tmp_path_factory):
    """A data folder (DRLLM_DATA_DIR) of the first 12 ARC-Easy train and 6 validation items of the embedded copy
    (eval reads the whole train split for the routers' dev part); no hub."""
    from drllm.tasks.data import EMBEDDED_DIR

    data = tmp_path_factory.mktemp("data")
    for split, n in (("train", 12), ("validation", 6)):
        lines = (EMBEDDED_DIR / "arc_easy" / f"{split}.jsonl").read_text().splitlines()[:n]
        (data / "arc_easy").mkdir(exist_ok=True)
        (data / "arc_easy" / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, "datasets", None)
        mp.setenv("DRLLM_DATA_DIR", str(data))
        yield data


def quiet_main(argv: list[str]) -> tuple[int, str]:
    """``drllm ARGV`` with its printed output."""
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        code = main(argv)
    return code, buffer.getvalue()


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_dir, offline, one_thread):
    """``drllm train --budget`` once: (routers folder, printed output, the --json record)."""
    tmp = tmp_path_factory.mktemp("budget")
    out, record = tmp / "routers", tmp / "selection.json"
    code, printed = quiet_main(["train", "--budget", "--model", str(tiny_dir), *TRAIN, "--out", str(out),
                                "--json", str(record)])
    assert code == 0
    return out, printed, json.loads(record.read_text())


# ---------------------------------------------------------------- drllm train --budget


def test_train_budget_writes_routers_and_selection_and_prints_the_dev_table(trained):
    out, printed, record = trained
    selection = read_selection(out)
    assert selection == record and selection["kind"] == "budget"
    assert selection["budgets"] == [1, 2] and selection["tap"] == 1 and selection["settings"]["epochs"] == 5
    assert selection["budget"] in (0, 1, 2)
    items = [e.id for e in load_task("arc_easy", "train")]
    assert selection["train"] + selection["dev"] == 12 and set(selection["dev_ids"]) < set(items)
    routers = drllm.BudgetRouters.from_pretrained(out)
    assert (routers.num_blocks, routers.tap, routers.head) == (L, 1, selection["head"])
    free = drllm.BudgetRouters.from_pretrained(out / "label-free")
    assert free.head == selection["label_free"]["head"]
    # the dev table: every head and target at every budget, with vanilla and the oracle of each head (the record
    # read back lists keys sorted: the same rows)
    assert all(line in printed for line in budget_selection_lines(selection).splitlines())
    assert [(e["head"], e["target"]) for e in selection["scored"]] == [
        ("blocks", "margin"), ("blocks", "kl"), ("sets", "margin"), ("sets", "kl")]
    assert f"budget routers written to {out}" in printed


@pytest.mark.parametrize("argv, needle", [
    (["--paths", "p.jsonl"], "--paths: not an option of budget routers"),
    (["--lam", "0", "--min-margin", "0.2"], "--min-margin, --lam: not an option of budget routers"),
    (["--budgets", "0,1"], "--budgets: budgets must be distinct integers >= 1, got '0,1'"),
    (["--budgets", "1,x"], "--budgets: write budgets as whole numbers"),
    (["--budgets", "1,1"], "--budgets: budgets must be distinct"),
    (["--tap", "-1"], "--tap: must be an integer >= 0, got -1"),
    (["--task", "gsm8k"], "give a multiple-choice task (arc_easy, arc_challenge), not gsm8k"),
    (["--dev-fraction", "0"], "--dev-fraction must be in (0, 1)"),
    (["--budgets", "12"], "the vocabulary skips only the --allowed 10 least damaging blocks; ask budgets up to 10"),
    (["--n", "1"], "1 items with --dev-fraction 0.2 leave an empty train or dev part"),
    (["--split", "test"], "cannot load arc_easy/test"),
])
def test_train_budget_refuses_bad_input_in_one_line_before_the_model_loads(argv, needle, no_model_no_hub, capsys,
                                                                          tmp_path):
    code, err = run_cli(["train", "--budget", *argv, "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and err.count("\n") == 1 and err.startswith("drllm train: error: "), err
    assert needle in err


@pytest.mark.parametrize("argv, needle", [
    ([], "the following arguments are required: --paths (or --budget for budget routers)"),
    (["--paths", "p.jsonl", "--budgets", "1,2", "--tap", "1"], "--budgets, --tap: options of budget routers: add "
                                                              "--budget"),
])
def test_train_without_budget_needs_paths_and_refuses_budget_options(argv, needle, no_model_no_hub, capsys, tmp_path):
    code, err = run_cli(["train", *argv, "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and err.count("\n") == 1 and needle in err, err


@pytest.mark.parametrize("argv, needle", [
    (["--tap", "6"], "--tap 6: tap must be a block in [0, 6)"),
    (["--tap", "4", "--budgets", "3"], "the blocks from --tap 4 on allow at most 2 skips per row"),
])
def test_train_budget_checks_the_tap_and_budgets_against_the_model(argv, needle, tiny_dir, offline, capsys, tmp_path):
    code, err = run_cli(["train", "--budget", "--model", str(tiny_dir), "--n", "12", *argv,
                         "--out", str(tmp_path / "out")], capsys)
    error = err.split("\r")[-1].split("\n")[-2:]  # after the model's loading bar: one line
    assert code == 2 and error[0].startswith("drllm train: error: ") and needle in error[0] and error[1] == "", err
    assert not (tmp_path / "out").exists()  # refused before any damage was measured


# ---------------------------------------------------------------- drllm eval --routers DIR --budgets


def test_eval_writes_one_row_per_budget_with_the_oracle_and_static_spread(trained, tiny_dir, offline, tmp_path,
                                                                         capsys):
    out, _, selection = trained
    report = tmp_path / "eval.json"
    assert main(["eval", "--model", str(tiny_dir), "--routers", str(out), "--budgets", "1,2", "--n", "6",
                 "--baselines", "static", "shortgpt", "exit:1,2", "random", "--seeds", "2", "--resamples", "2",
                 "--json", str(report)]) == 0
    printed = capsys.readouterr().out
    res = json.loads(report.read_text())
    methods = res["methods"]
    by = lambda name: [m for m in methods if m["method"] == name]  # noqa: E731
    for name in ("routers", "routers label-free"):  # one row per K, exactly L - K blocks per pass
        rows = by(name)
        assert [(m["setting"], m["budget"]) for m in rows] == [("budget 1", 1), ("budget 2", 2)]
        assert [m["blocks_per_pass"] for m in rows] == [L - 1, L - 2] and all(m["n"] == 6 for m in rows)
    assert [(m["setting"], m["budget"], m["blocks_per_pass"]) for m in by("oracle")] == [(1, 1, L - 1), (2, 2, L - 2)]
    for name in ("static", "shortgpt", "exit", "random"):
        assert [m["setting"] for m in by(name)] == [1, 2], name
    resampled = by("static-resampled")
    assert [m["setting"] for m in resampled] == [1, 2]
    assert all(len(m["runs"]) == 2 and "std" in m["spread"] for m in resampled)
    # the routers retrained on resamples (drllm train --budget's default 3): one row per K, every retrain a run
    retrained = by("routers-resampled")
    assert [(m["setting"], m["budget"], m["blocks_per_pass"]) for m in retrained] == [("budget 1", 1, L - 1),
                                                                                       ("budget 2", 2, L - 2)]
    assert all(len(m["runs"]) == selection["resampled"]["count"] == 3 and "std" in m["spread"] for m in retrained)
    assert "3 retrains on resamples from resampled/" in printed
    # static and its resamples are chosen on the routers' own dev part, the same draws as the routers' retrains
    assert res["baselines"]["static-resampled"]["calibration_ids"] == selection["resampled"]["dev_ids"][:2]
    assert set(res["baselines"]["static"]["calibration_ids"]) == set(selection["dev_ids"])
    draws = res["baselines"]["static-resampled"]["calibration_ids"]
    assert len(draws) == 2 and all(len(d) == selection["dev"] and set(d) <= set(selection["dev_ids"]) for d in draws)
    # each routers row is what its paths (the runtime's own: tests/test_budget_train.py) score when forced,
    # item by item
    examples = load_task("arc_easy", "validation")
    model, tok = load_model(str(tiny_dir), device="cpu")
    for row, result in zip(by("routers"), res["results"]):
        paths = result["decisions"]
        assert all(p.count("0") == row["budget"] and set(p) <= {"0", "1"} and p[0] == "1" for p in paths)
        forced = [score_paths(model, tok, [ex], [p])[0][0]["correct"] for ex, p in zip(examples, paths)]
        assert "".join(map(str, forced)) == row["items"]
    if selection["head"] == "sets":  # the oracle of head sets: some vocabulary set answers, the routers pick one
        for r, o in zip(by("routers"), by("oracle")):
            assert all(a <= b for a, b in zip(r["items"], o["items"]))
    # the dev table, and the budget routers against static at each K (McNemar, equal compute)
    assert all(line in printed for line in budget_selection_lines(selection).splitlines())
    assert "budget routers evaluated at budgets 1, 2 (given on the command line)" in printed
    versus = routers_vs_baselines(methods)
    assert format_table(*versus) in printed
    pairs = {(row[0], row[2]) for row in versus[1]}
    for who in ("budget", "label-free budget", "resampled budget"):  # each K against static, its resamples, oracle
        for k in (1, 2):
            assert {(f"{who} {k}", f"{m}:{k}") for m in ("static", "static-resampled", "oracle")} <= pairs
    assert all(base.endswith(":" + who[-1]) for who, base in pairs)  # never against another K


def test_eval_reads_the_budgets_from_the_selection_and_skips_a_missing_label_free(tiny_dir, offline, tmp_path, capsys):
    folder = budget_routers(tmp_path / "r")
    (folder / "selection.json").unlink()  # no selection: head sets serves its vocabulary's budgets
    report = tmp_path / "eval.json"
    assert main(["eval", "--model", str(tiny_dir), "--routers", str(folder), "--n", "2", "--json", str(report)]) == 0
    methods = json.loads(report.read_text())["methods"]
    assert [m["method"] for m in methods] == ["vanilla", "routers", "routers", "oracle", "oracle"]
    # the one vocabulary set of each K is every row's path
    assert [r["decisions"] for r in json.loads(report.read_text())["results"]] == [["111011"] * 2, ["100111"] * 2]
    assert "(the budgets of the routers' vocabulary)" in capsys.readouterr().out


@pytest.mark.parametrize("argv, make, needle", [
    (["--budgets", "1,2"], "paper", "--budgets needs budget routers (drllm train --budget); "),
    (["--lam", "0"], "budget", "--lam moves the paper's per-block routers"),
    (["--budgets", "3"], "budget", "these budget routers cannot skip 3 blocks per row: they serve K in [0, 1, 2]"),
    ([], "no selection, head blocks", "holds no selection.json to read the budgets from: give --budgets"),
    ([], "budget selection, per-block routers", "selection.json was written for budget routers, but"),
    (["--baselines", "static:x"], "budget", "K must be whole numbers"),
])
def test_eval_refuses_budget_mistakes_in_one_line_before_the_model_loads(argv, make, needle, no_model_no_hub, capsys,
                                                                        tmp_path):
    folder = tmp_path / "r"
    folder.mkdir()
    if make == "paper":
        saved_routers(folder)
    elif make == "budget":
        budget_routers(folder)
    elif make == "no selection, head blocks":
        drllm.BudgetRouters.for_model(tiny_model("llama", num_layers=L), tap=1).save_pretrained(folder)
    else:
        saved_routers(folder)
        budget_routers(tmp_path / "b")
        (folder / "selection.json").write_text((tmp_path / "b" / "selection.json").read_text())
    code, err = run_cli(["eval", "--routers", str(folder), *argv], capsys)
    assert code == 2 and err.count("\n") == 1 and err.startswith("drllm eval: error: "), err
    assert needle in err


# ---------------------------------------------------------------- selection.json of budget routers


def test_routing_knobs_read_the_budget_of_a_budget_selection(tmp_path):
    selection = read_selection(budget_routers(tmp_path / "r", budget=1))
    assert routing_knobs(selection) == {"lam": (0.0, "chosen by drllm train"), "budget": (1, "chosen by drllm train")}
    assert routing_knobs(selection, budget=2)["budget"] == (2, "given on the command line")


# ---------------------------------------------------------------- drllm generate --routers DIR [--budget K]


def test_generate_routes_at_the_selection_budget_unless_given(tiny_dir, tmp_path, capsys):
    """The one vocabulary set of each K fixes the path: K=2 skips blocks 1 and 2, K=1 block 3, K=0 none."""
    folder = budget_routers(tmp_path / "r", budget=2)
    report = tmp_path / "gen.json"

    def generate(*extra):
        assert main(["generate", "--model", str(tiny_dir), "--routers", str(folder), "--no-chat",
                     "--max-new-tokens", "2", "--json", str(report), *extra, "hello", "a longer prompt"]) == 0
        return json.loads(report.read_text()), capsys.readouterr().out

    chosen, out = generate()
    assert [r["path"] for r in chosen["results"]] == ["100111"] * 2 and chosen["budget"] == 2
    assert out.startswith("### hello\npath: 100111 (4/6 block applications per pass)\n")
    assert "budget routers at budget 2 (chosen by drllm train): 4 of 6 blocks per pass" in out
    given, out = generate("--budget", "1")
    assert [r["path"] for r in given["results"]] == ["111011"] * 2 and given["budget"] == 1
    assert "budget routers at budget 1 (given on the command line)" in out
    vanilla, _ = generate("--budget", "0")
    assert [r["path"] for r in vanilla["results"]] == ["111111"] * 2


def test_generate_with_trained_routers_skips_exactly_the_chosen_budget(trained, tiny_dir, tmp_path, capsys):
    out, _, selection = trained
    report = tmp_path / "gen.json"
    for extra, budget in (([], selection["budget"]), (["--budget", "1"], 1)):
        assert main(["generate", "--model", str(tiny_dir), "--routers", str(out), "--no-chat", "--max-new-tokens",
                     "2", "--json", str(report), *extra, "hello", "what is the sun?"]) == 0
        paths = [r["path"] for r in json.loads(report.read_text())["results"]]
        assert all(p.count("0") == budget and set(p) <= {"0", "1"} and p[0] == "1" for p in paths), paths
        assert f"{L - budget} of {L} blocks per pass" in capsys.readouterr().out


@pytest.mark.parametrize("argv, make, needle", [
    (["--budget", "1"], "paper", "--budget needs budget routers (drllm train --budget); "),
    (["--budget", "1"], None, "--budget needs budget routers (drllm train --budget); give --routers"),
    (["--budget", "5"], "budget", "these budget routers cannot skip 5 blocks per row"),
    (["--lam", "0.5"], "budget", "--lam moves the paper's per-block routers"),
    ([], "budget without selection", "holds no selection.json to read the budget from: give --budget K"),
    (["--budget", "-1"], "budget", "--budget: must be an integer >= 0, got -1"),
])
def test_generate_refuses_budget_mistakes_in_one_line_before_the_model_loads(argv, make, needle, no_model_no_hub,
                                                                            capsys, tmp_path):
    folder = tmp_path / "r"
    folder.mkdir()
    if make == "paper":
        saved_routers(folder)
    elif make is not None:
        budget_routers(folder)
        if make == "budget without selection":
            (folder / "selection.json").unlink()
    code, err = run_cli(["generate", *(["--routers", str(folder)] if make else []), *argv, "hello"], capsys)
    assert code == 2 and err.count("\n") == 1 and err.startswith("drllm generate: error: "), err
    assert needle in err
