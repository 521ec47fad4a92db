"""run_search: JSONL records, resume after an interruption, torn lines, shards and merge, the CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import tiny_model
from tiny_tokenizer import make_tiny_tokenizer

import drllm.search.run as run_mod
from drllm.artifacts import ArtifactError, OutputLockedError, settings_path
from drllm.cli import main
from drllm.search import SearchConfig, merge_shards, read_records, run_search, shard_path, summarize
from drllm.tasks import Example

# Tiny models are all per-op overhead: one intra-op thread is faster (far faster on a busy machine).
pytestmark = pytest.mark.usefixtures("one_thread")

FIELDS = {"id", "task", "prompt", "gold", "num_blocks", "default_reward", "default_margin", "best_path",
          "best_reward", "best_margin", "best_length", "good_paths", "evaluations", "seconds"}


def make_examples(n=5):
    out = []
    for i in range(n):
        choices = ("red", "a blue sky", "green grass", f"number {i}")
        out.append(Example(id=f"toy-{i}", task="arc_easy", question=f"Question number {i}: which colour?",
                           answer="ABCD"[i % 4], choices=choices, labels=("A", "B", "C", "D"), gold_index=i % 4))
    return out


def strip(records):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in records]


@pytest.fixture(scope="module")
def setup():
    return tiny_model("llama", seed=3, num_layers=5), make_tiny_tokenizer()


CONFIG = SearchConfig(simulations=12, batch=4, seed=7)


@pytest.fixture(scope="module")
def reference(setup, tmp_path_factory):
    model, tok = setup
    out = tmp_path_factory.mktemp("ref") / "paths.jsonl"
    summary = run_search(model, tok, make_examples(), out, config=CONFIG, progress=False)
    return read_records(out), summary


def test_records_and_summary(reference, setup):
    records, summary = reference
    assert [r["id"] for r in records] == [f"toy-{i}" for i in range(5)]
    for r in records:
        assert FIELDS <= set(r)
        assert r["num_blocks"] == 5 and r["prompt"].startswith("Question: Question number")
        if r["best_path"] is None:
            assert r["default_reward"] == 0 and r["good_paths"] == [] and r["best_reward"] == 0
        else:
            assert r["best_reward"] == 1 and r["best_path"] == r["good_paths"][0]["path"]
            assert r["best_length"] == sum(map(int, r["best_path"]))
            assert all(g["reward"] == 1 for g in r["good_paths"])
        if r["default_reward"]:
            assert r["best_length"] <= 5  # the default is correct, so the best is no longer than it
    assert summary == summarize(records)
    assert summary["n"] == 5 and 0 <= summary["default_accuracy"] <= summary["best_accuracy"] <= 1
    assert summary["evaluations"] == sum(r["evaluations"] for r in records)


def test_interrupted_run_resumes_to_same_records(reference, setup, tmp_path, monkeypatch):
    model, tok = setup
    out = tmp_path / "paths.jsonl"
    real = run_mod.search_example
    calls = []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # interrupted during the third example
        return real(*args, **kwargs)

    monkeypatch.setattr(run_mod, "search_example", flaky)
    with pytest.raises(KeyboardInterrupt):
        run_search(model, tok, make_examples(), out, config=CONFIG, progress=False)
    assert [r["id"] for r in read_records(out)] == ["toy-0", "toy-1"]
    with open(out, "a") as f:  # and a write cut in the middle of a line
        f.write('{"id": "toy-2", "task": "arc_e')
    assert [r["id"] for r in read_records(out)] == ["toy-0", "toy-1"]
    monkeypatch.setattr(run_mod, "search_example", real)
    calls.clear()
    summary = run_search(model, tok, make_examples(), out, config=CONFIG, progress=True)
    assert strip(read_records(out)) == strip(reference[0])
    assert summary["n"] == 5
    assert all(json.loads(line) for line in out.read_text().splitlines())  # the torn line is gone
    # a rerun does nothing
    before = out.read_text()
    run_search(model, tok, make_examples(), out, config=CONFIG, progress=False)
    assert out.read_text() == before


def test_corrupt_middle_line_is_an_error(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text('{"id": "a"}\nnot json\n{"id": "b"}\n')
    with pytest.raises(ValueError, match=r"x.jsonl:2"):
        read_records(p)


def test_shards_and_merge(reference, setup, tmp_path):
    model, tok = setup
    out = tmp_path / "paths.jsonl"
    examples = make_examples()
    shards = [shard_path(out, i, 2) for i in range(2)]
    assert shards[0].name == "paths.shard0-of-2.jsonl"
    for i in range(2):
        s = run_search(model, tok, examples, shards[i], config=CONFIG, shard=(i, 2), progress=False)
        assert s["n"] == len(examples[i::2])
    merged = merge_shards(shards, out, ids=[e.id for e in examples])
    assert strip(merged) == strip(reference[0]) == strip(read_records(out))
    with pytest.raises(ValueError, match="no record"):
        merge_shards(shards[:1], tmp_path / "bad.jsonl", ids=[e.id for e in examples])
    with pytest.raises(ValueError, match="shard"):
        run_search(model, tok, examples, out, config=CONFIG, shard=(2, 2), progress=False)


def _write_arc(folder, examples):
    (folder / "arc_easy").mkdir(parents=True)
    with open(folder / "arc_easy" / "train.jsonl", "w") as f:
        for e in examples:
            f.write(json.dumps({"id": e.id, "question": e.question, "answerKey": e.answer,
                                "choices": {"text": list(e.choices), "label": list(e.labels)}}) + "\n")


def test_cli_torchrun_ranks_and_merge(reference, setup, tmp_path, monkeypatch, capsys):
    """Under torchrun env vars each rank writes its shard; rank 0 merges once all shards are complete."""
    model, tok = setup
    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    _write_arc(tmp_path / "data", make_examples())
    out = tmp_path / "out.jsonl"
    argv = ["search", "--model", str(model_dir), "--device", "cpu", "--task", "arc_easy", "--split", "train",
            "--n", "5", "--simulations", "12", "--batch", "4", "--seed", "7", "--data-dir", str(tmp_path / "data"),
            "--out", str(out), "--no-progress"]
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert main(argv) == 0
    assert not out.exists() and shard_path(out, 1, 2).is_file()
    monkeypatch.setenv("RANK", "0")
    assert main(argv + ["--json", str(tmp_path / "summary.json")]) == 0
    assert strip(read_records(out)) == strip(reference[0])
    assert json.loads(settings_path(out).read_text())["split"] == "train"  # the shards' settings, merged
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["n"] == 5 and summary["default_accuracy"] == reference[1]["default_accuracy"]
    assert "best-path accuracy" in capsys.readouterr().out
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.delenv("RANK")
    merged = tmp_path / "merged.jsonl"
    assert main(["search", "--merge", str(merged), str(shard_path(out, 0, 2)), str(shard_path(out, 1, 2))]) == 0
    assert sorted(r["id"] for r in read_records(merged)) == [f"toy-{i}" for i in range(5)]


def test_skip_probe_matches_direct_evaluation_and_resumes(setup, tmp_path):
    """Each probe record holds the margins PathEvaluator gives the single-skip paths; a rerun after a torn
    last line recomputes only what is missing and ends with the same records."""
    from drllm.search import PathEvaluator, block_gains, probe_skips, shared_skip, single_skip_paths

    model, tok = setup
    examples = make_examples(4)
    out = tmp_path / "skips.jsonl"
    records = probe_skips(model, tok, examples, out, config=CONFIG, progress=False)
    assert [r["id"] for r in records] == [e.id for e in examples]
    for ex, rec in zip(examples, records):
        ev = PathEvaluator(model, tok, ex, mode="loglik", prefix=False)
        assert rec["num_blocks"] == 5 and rec["default_margin"] == pytest.approx(ev.default.margin, abs=1e-4)
        assert rec["skip_margins"] == pytest.approx([r.margin for r in ev.evaluate(single_skip_paths(5))], abs=1e-4)
    lines = out.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:2]) + lines[2][:15])  # interrupted while writing the third record
    again = probe_skips(model, tok, examples, out, config=CONFIG, progress=False)
    assert strip(again) == strip(records) and strip(read_records(out)) == strip(records)
    gains = block_gains(records)
    assert [g["net"] for g in gains] == [g["gained"] - g["lost"] for g in gains]
    best = shared_skip(records)
    assert best is None or gains[best]["net"] == max(g["net"] for g in gains) >= 0


def test_cli_probe_skips(setup, tmp_path, capsys):
    from drllm.search import block_gains, probe_skips, shared_skip

    model, tok = setup
    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    _write_arc(tmp_path / "data", make_examples())
    argv = ["search", "--model", str(model_dir), "--device", "cpu", "--task", "arc_easy", "--split", "train",
            "--n", "3", "--simulations", "4", "--batch", "4", "--data-dir", str(tmp_path / "data"),
            "--out", str(tmp_path / "paths.jsonl"), "--no-progress"]
    skips = tmp_path / "skips.jsonl"
    assert main(argv + ["--probe-skips", str(skips), "--json", str(tmp_path / "s.json")]) == 0
    probes = read_records(skips)
    assert [p["id"] for p in probes] == [f"toy-{i}" for i in range(3)]
    again = probe_skips(model, tok, make_examples(3), tmp_path / "direct.jsonl", progress=False)
    for a, b in zip(probes, again):
        assert a["skip_margins"] == pytest.approx(b["skip_margins"], abs=1e-4)
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["shared_skip"] == shared_skip(probes) and summary["block_gains"] == block_gains(probes)
    assert "shared skip (probe)" in capsys.readouterr().out
    assert main(argv + ["--probe-skips", str(skips), "--shard", "0/2"]) == 2
    assert capsys.readouterr().err == ("drllm search: error: --probe-skips needs --reward loglik and no sharding "
                                       "(probe in one process)\n")


def test_shared_skip_prefers_net_gain_then_fewest_flips():
    from drllm.search import shared_skip

    def rec(default, skips):
        return {"num_blocks": 3, "default_margin": default, "skip_margins": skips}

    # block 0: +1 -1 (net 0, 2 flips); block 1: no flip (net 0); block 2: -1 (net -1)
    records = [rec(0.2, [-0.1, 0.1, -0.3]), rec(-0.2, [0.1, -0.1, -0.1]), rec(0.3, [0.2, 0.2, 0.1])]
    assert shared_skip(records) == 1
    assert shared_skip([rec(-0.2, [0.1, -0.1, -0.1])] + records) == 0  # net +1 beats fewer flips
    assert shared_skip([rec(0.2, [-0.1, -0.1, -0.1])]) is None  # every skip loses
    assert shared_skip([]) is None


def _cli_argv(tmp_path, out, *extra):
    _write_arc(tmp_path / "data", make_examples())
    return ["search", "--model", str(tmp_path / "no-such-model"), "--device", "cpu", "--task", "arc_easy",
            "--split", "train", "--data-dir", str(tmp_path / "data"), "--out", str(out), "--no-progress", *extra]


def test_second_writer_fails_at_once_naming_the_pid(setup, tmp_path, capsys):
    model, tok = setup
    out = tmp_path / "paths.jsonl"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from drllm.artifacts import exclusive_lock\n"
         "with exclusive_lock(sys.argv[1]):\n    print('locked', flush=True); time.sleep(60)", str(out)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(OutputLockedError, match=rf"being written by another process \(PID {holder.pid}"):
            run_search(model, tok, make_examples(2), out, config=CONFIG, progress=False)
        # the command refuses before it loads the model (this model path does not exist)
        assert main(_cli_argv(tmp_path, out)) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("drllm search: error:") and f"PID {holder.pid}" in err and "\n" not in err
    finally:
        holder.kill()
        holder.wait()
    assert not out.exists()
    run_search(model, tok, make_examples(2), out, config=CONFIG, progress=False)  # the lock went with its holder
    assert [r["id"] for r in read_records(out)] == ["toy-0", "toy-1"]


def test_rerun_with_other_settings_is_refused_unless_overwritten(setup, tmp_path):
    model, tok = setup
    out = tmp_path / "paths.jsonl"
    run_search(model, tok, make_examples(2), out, config=CONFIG, progress=False)
    recorded = json.loads(settings_path(out).read_text())
    assert recorded["kind"] == "search" and recorded["task"] == "arc_easy" and recorded["reward"] == "loglik"
    assert (recorded["simulations"], recorded["seed"], recorded["min_margin"]) == (12, 7, 0.0)
    assert len(recorded["model"]) == 64  # the weights' fingerprint
    before = out.read_text()
    other = SearchConfig(simulations=13, batch=4, seed=8, min_margin=0.1)
    with pytest.raises(ArtifactError, match="other settings") as info:
        run_search(model, tok, make_examples(3), out, config=other, progress=False)
    message = str(info.value)
    for change in ("simulations: 12 -> 13", "seed: 7 -> 8", "min_margin: 0.0 -> 0.1", "new --out", "--overwrite"):
        assert change in message
    assert out.read_text() == before  # nothing appended
    run_search(model, tok, make_examples(3), out, config=other, progress=False, overwrite=True)
    assert [r["id"] for r in read_records(out)] == ["toy-0", "toy-1", "toy-2"]
    assert json.loads(settings_path(out).read_text())["simulations"] == 13
    # more items under the same settings extend the file
    run_search(model, tok, make_examples(4), out, config=other, progress=False)
    assert len(read_records(out)) == 4


def test_output_without_recorded_settings_is_refused(setup, tmp_path):
    model, tok = setup
    out = tmp_path / "paths.jsonl"
    out.write_text(json.dumps({"id": "toy-0"}) + "\n")  # written by an older drllm
    with pytest.raises(ArtifactError, match="no paths.jsonl.settings.json.*--overwrite"):
        run_search(model, tok, make_examples(2), out, config=CONFIG, progress=False)


def test_skip_probe_output_is_bound_to_its_settings(setup, tmp_path):
    from drllm.search import probe_skips

    model, tok = setup
    out = tmp_path / "skips.jsonl"
    probe_skips(model, tok, make_examples(2), out, config=CONFIG, progress=False)
    assert json.loads(settings_path(out).read_text())["kind"] == "skip probe"
    with pytest.raises(ArtifactError, match="normalize: 'chars' -> 'tokens'"):
        probe_skips(model, tok, make_examples(2), out, config=SearchConfig(normalize="tokens"), progress=False)
    with pytest.raises(ArtifactError, match="kind: 'skip probe' -> 'search'"):  # not a search output
        run_search(model, tok, make_examples(2), out, config=CONFIG, progress=False)


def test_merge_refuses_shards_of_different_searches(setup, tmp_path):
    model, tok = setup
    examples = make_examples(2)
    shards = [shard_path(tmp_path / "p.jsonl", i, 2) for i in range(2)]
    run_search(model, tok, examples, shards[0], config=CONFIG, shard=(0, 2), progress=False)
    run_search(model, tok, examples, shards[1], config=SearchConfig(simulations=12, batch=4, seed=9), shard=(1, 2),
               progress=False)
    with pytest.raises(ArtifactError, match=r"p.shard1-of-2.jsonl was made with other settings.*seed: 7 -> 9"):
        merge_shards(shards, tmp_path / "p.jsonl")
    assert not (tmp_path / "p.jsonl").exists()


@pytest.mark.parametrize("n", ["0", "-1", "two"])
def test_n_must_be_a_positive_count(tmp_path, capsys, n):
    with pytest.raises(SystemExit) as info:
        main(_cli_argv(tmp_path, tmp_path / "out.jsonl", "--n", n))
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("drllm search: error: argument --n") and "\n" not in err


def test_model_fingerprint_ignores_where_the_model_was_loaded_from(setup, tmp_path):
    from transformers import AutoModelForCausalLM

    from drllm.artifacts import model_fingerprint

    model, _ = setup
    for name in ("a", "b"):
        model.save_pretrained(tmp_path / name)
    a, b = (AutoModelForCausalLM.from_pretrained(tmp_path / name) for name in ("a", "b"))
    assert model_fingerprint(a) == model_fingerprint(b) == model_fingerprint(model)
    with torch.no_grad():
        b.model.layers[0].mlp.up_proj.weight[0, 0] += 1.0
    assert model_fingerprint(b) != model_fingerprint(a)
