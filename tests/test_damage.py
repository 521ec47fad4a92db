"""Damage targets: equal an explicit skip-and-score loop, read no gold answer in the label-free mode, resume,
refuse other settings, a second writer and corrupt lines."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from conftest import tiny_model
from tiny_tokenizer import make_tiny_tokenizer

import drllm
import drllm.train.damage as damage_mod
from drllm.artifacts import ArtifactError, OutputLockedError, exclusive_lock, settings_path
from drllm.paths import path_from_str
from drllm.search import PathEvaluator
from drllm.tasks import Example, encode_prompt, score_choices
from drllm.tasks.prompts import cloze_context, generation_prompt
from drllm.train import damage_candidates, measure_damage, read_damage

# Tiny models are all per-op overhead: one intra-op thread is faster (far faster on a busy machine).
pytestmark = pytest.mark.usefixtures("one_thread")

L = 5
# the single-block skips, then vocabulary sets
CANDIDATES = [[i] for i in range(L)] + [[1, 3], [0, 2, 4], [2, 3]]


def mc_examples(n=4):
    out = []
    for i in range(n):
        choices = ("red", "a blue sky", "green grass", f"number {i}")[: 3 + i % 2]
        out.append(Example(id=f"mc-{i}", task="arc_easy", question=f"Question number {i}: which colour?",
                           answer="ABCD"[i % len(choices)], choices=choices, labels=tuple("ABCD"[: len(choices)]),
                           gold_index=i % len(choices)))
    return out


def text_examples(n=2):
    return [Example(id=f"gsm-{i}", task="gsm8k", question=f"Tom has {i + 2} apples and eats one. How many?",
                    answer=str(i + 1)) for i in range(n)]


def scrambled(ex: Example) -> Example:
    """The item with another gold answer (or none)."""
    if ex.choices:
        return dataclasses.replace(ex, answer="", gold_index=None)
    return dataclasses.replace(ex, answer="-12345")


def strip(records):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in records]


def model_of(seed):
    """Larger initial weights than the default: single skips then flip answers both ways."""
    return tiny_model("llama", seed=seed, num_layers=L, initializer_range=0.3)


@pytest.fixture(scope="module")
def setup():
    return model_of(3), make_tiny_tokenizer()


def skip_path(blocks):
    return path_from_str("".join("0" if i in blocks else "1" for i in range(L)))


def softmax_kl(p_scores, q_scores):
    p = torch.tensor(p_scores, dtype=torch.float64).softmax(-1)
    q = torch.tensor(q_scores, dtype=torch.float64).softmax(-1)
    return float((p * (p.log() - q.log())).sum())


def test_choice_targets_equal_an_explicit_loop(setup, tmp_path):
    model, tok = setup
    examples = mc_examples()
    records = measure_damage(model, tok, examples, tmp_path / "d.jsonl", candidates=CANDIDATES, max_paths=3,
                             progress=False)
    assert [r["id"] for r in records] == [e.id for e in examples]
    for ex, rec in zip(examples, records):
        full = score_choices(model, tok, [ex])[0]  # the unpatched model: the default path
        assert rec["mode"] == "choices" and rec["num_blocks"] == L and rec["evaluations"] == len(CANDIDATES)
        assert rec["default_scores"] == pytest.approx(full.normalized, abs=1e-5)
        assert rec["default_margin"] == pytest.approx(full.margin, abs=1e-5)
        assert rec["default_correct"] == full.correct
        assert rec["routing_tokens"] == encode_prompt(tok, cloze_context(ex, tok), cloze=True)
        for k, blocks in enumerate(CANDIDATES):
            with drllm.forced_paths(model, skip_path(blocks)):
                skipped = score_choices(model, tok, [ex])[0]
            assert rec["margin"][k] == pytest.approx(full.margin - skipped.margin, abs=1e-5)
            assert rec["kl"][k] == pytest.approx(softmax_kl(full.normalized, skipped.normalized), rel=1e-3, abs=1e-8)
            assert rec["correct"][k] == skipped.correct
    # the skips do change the answers, both ways
    assert any(k > 0.1 for r in records for k in r["kl"])
    flips = {(r["default_correct"], c) for r in records for c in r["correct"]}
    assert {(0, 1), (1, 0)} <= flips
    assert not drllm.is_patched(model)
    assert strip(read_damage(tmp_path / "d.jsonl")) == strip(records)
    assert damage_candidates(tmp_path / "d.jsonl") == CANDIDATES


def test_evaluator_scores_are_the_normalised_choice_scores(setup):
    model, tok = setup
    ex = mc_examples()[1]
    ev = PathEvaluator(model, tok, ex, max_paths=2)
    (res,) = ev.evaluate(["10111"])
    with drllm.forced_paths(model, path_from_str("10111")):
        ref = score_choices(model, tok, [ex])[0]
    assert res.scores == pytest.approx(ref.normalized, abs=1e-5)
    assert "scores" not in res.as_record()  # search records keep their fields


def test_every_candidate_of_an_item_in_as_few_calls_as_allowed(setup, tmp_path):
    """One forward on the default path, then ceil(8 candidates / 3 per call) = 3 batched calls per item."""
    model, tok = setup
    batches = []
    hook = model.model.register_forward_hook(lambda m, args, out: batches.append(out.last_hidden_state.shape[0]))
    try:
        for labels in (True, False):
            batches.clear()
            measure_damage(model, tok, mc_examples(1), tmp_path / f"{labels}.jsonl", candidates=CANDIDATES,
                           labels=labels, max_paths=3, progress=False)
            assert batches == [1, 3, 3, 2]
    finally:
        hook.remove()


def next_token_kl(model, tokens, blocks):
    ids = torch.tensor([tokens])
    with torch.no_grad():
        log_p = model(input_ids=ids).logits[0].double().log_softmax(-1)
        with drllm.forced_paths(model, skip_path(blocks)):
            log_q = model(input_ids=ids).logits[0].double().log_softmax(-1)
    return float((log_p.exp() * (log_p - log_q)).sum(-1).mean())


def test_label_free_targets_equal_an_explicit_loop_and_read_no_gold(setup, tmp_path):
    model, tok = setup
    examples = mc_examples(2) + text_examples()
    records = measure_damage(model, tok, examples, tmp_path / "free.jsonl", candidates=CANDIDATES, labels=False,
                             max_paths=4, progress=False)
    for ex, rec in zip(examples, records):
        if ex.choices:  # the cloze context
            tokens = encode_prompt(tok, cloze_context(ex, tok, style="plain"), cloze=True)
        else:  # the generation prompt (chat template: its special tokens are in the text)
            tokens = encode_prompt(tok, generation_prompt(ex, tok, style="auto"))
        assert rec["mode"] == "text" and rec["routing_tokens"] == tokens
        assert not {"margin", "correct", "default_margin", "default_correct", "default_scores"} & set(rec)
        for k, blocks in enumerate(CANDIDATES):
            assert rec["kl"][k] == pytest.approx(next_token_kl(model, tokens, blocks), rel=1e-4, abs=1e-6)
    assert all(k > 0 for r in records for k in r["kl"])
    # the same items with their gold answers scrambled (or removed) give the same targets
    other = measure_damage(model, tok, [scrambled(e) for e in examples], tmp_path / "scrambled.jsonl",
                           candidates=CANDIDATES, labels=False, max_paths=4, progress=False)
    assert [r["kl"] for r in other] == [r["kl"] for r in records]
    with pytest.raises(ValueError, match="labels=False"):  # margins need the gold answer
        measure_damage(model, tok, [scrambled(examples[0])], tmp_path / "gold.jsonl", candidates=CANDIDATES,
                       progress=False)
    # without prefix reuse and one candidate per call: the same numbers
    plain = measure_damage(model, tok, examples, tmp_path / "plain.jsonl", candidates=CANDIDATES, labels=False,
                           prefix=False, max_paths=1, progress=False)
    for a, b in zip(plain, records):
        assert a["kl"] == pytest.approx(b["kl"], rel=1e-4, abs=1e-7)


def test_items_without_choices_are_measured_label_free_in_a_labelled_run(setup, tmp_path):
    model, tok = setup
    examples = mc_examples(2) + text_examples(1)
    records = measure_damage(model, tok, examples, tmp_path / "d.jsonl", candidates=CANDIDATES, progress=False)
    assert [r["mode"] for r in records] == ["choices", "choices", "text"]
    free = measure_damage(model, tok, text_examples(1), tmp_path / "f.jsonl", candidates=CANDIDATES, labels=False,
                          progress=False)
    assert records[2]["kl"] == free[0]["kl"]
    # the answer-distribution KL needs no gold label either
    gold = [dataclasses.replace(e, gold_index=(e.gold_index + 1) % len(e.choices), answer="Z") for e in examples[:2]]
    moved = measure_damage(model, tok, gold, tmp_path / "g.jsonl", candidates=CANDIDATES, progress=False)
    assert [r["kl"] for r in moved] == [r["kl"] for r in records[:2]]
    assert [r["margin"] for r in moved] != [r["margin"] for r in records[:2]]  # while the margins moved


def test_resume_after_a_partial_file(setup, tmp_path, monkeypatch):
    model, tok = setup
    examples = mc_examples(3) + text_examples(1)
    out = tmp_path / "d.jsonl"
    reference = measure_damage(model, tok, examples, tmp_path / "ref.jsonl", candidates=CANDIDATES, progress=False)
    measure_damage(model, tok, examples, out, candidates=CANDIDATES, progress=False)
    lines = out.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:2]) + lines[2][:25])  # interrupted while writing the third record
    assert [r["id"] for r in read_damage(out)] == ["mc-0", "mc-1"]  # the torn line is left out
    measured = []
    real = damage_mod._measure

    def counted(model, tok, ex, *args):
        measured.append(ex.id)
        return real(model, tok, ex, *args)

    monkeypatch.setattr(damage_mod, "_measure", counted)
    again = measure_damage(model, tok, examples, out, candidates=CANDIDATES, progress=True)
    assert measured == ["mc-2", "gsm-0"]  # only what was missing
    assert strip(again) == strip(reference) == strip(read_damage(out))
    assert all(json.loads(line) for line in out.read_text().splitlines())  # the torn line is gone


def test_other_settings_and_a_second_writer_are_refused(setup, tmp_path):
    model, tok = setup
    out = tmp_path / "d.jsonl"
    measure_damage(model, tok, mc_examples(2), out, candidates=CANDIDATES, progress=False)
    recorded = json.loads(settings_path(out).read_text())
    assert recorded["kind"] == "damage" and recorded["candidates"] == CANDIDATES and len(recorded["model"]) == 64
    assert (recorded["mode"], recorded["style"], recorded["normalize"]) == ("labels", None, "chars")
    before = out.read_text()
    for change, kwargs in [("candidates:", dict(candidates=CANDIDATES[:L])),
                           ("mode: 'labels' -> 'label-free'", dict(labels=False)),
                           ("normalize: 'chars' -> 'tokens'", dict(normalize="tokens")),
                           ("style: None -> 'chat'", dict(style="chat"))]:
        kwargs = {"candidates": CANDIDATES, **kwargs}
        with pytest.raises(ArtifactError, match=change):
            measure_damage(model, tok, mc_examples(3), out, progress=False, **kwargs)
    other = model_of(4)
    with pytest.raises(ArtifactError, match="model:"):
        measure_damage(other, tok, mc_examples(3), out, candidates=CANDIDATES, progress=False)
    with exclusive_lock(out):  # another writer holds the output
        with pytest.raises(OutputLockedError, match="being written by another process"):
            measure_damage(model, tok, mc_examples(3), out, candidates=CANDIDATES, progress=False)
    assert out.read_text() == before  # nothing appended
    measure_damage(model, tok, mc_examples(1), out, candidates=CANDIDATES[:2], progress=False, overwrite=True)
    assert damage_candidates(out) == CANDIDATES[:2] and len(read_damage(out)) == 1


@pytest.mark.parametrize("candidates, message", [
    ([[1, 0]], "sorted"), ([[2, 2]], "sorted"), ([[]], "non-empty"), ([[5]], "block >= 5"),
    ([[1], [1]], "twice"), ([], "non-empty list"), ([[True]], "sorted"),
])
def test_bad_candidates_are_refused(setup, tmp_path, candidates, message):
    model, tok = setup
    with pytest.raises(ValueError, match=message):
        measure_damage(model, tok, mc_examples(1), tmp_path / "d.jsonl", candidates=candidates, progress=False)
    assert not (tmp_path / "d.jsonl").exists()


@pytest.fixture(scope="module")
def written(setup, tmp_path_factory):
    model, tok = setup
    out = tmp_path_factory.mktemp("damage") / "d.jsonl"
    measure_damage(model, tok, mc_examples(2) + text_examples(1), out, candidates=CANDIDATES, progress=False)
    return out


def _set(rec, key, value):
    rec[key] = value


@pytest.mark.parametrize("line, corrupt, message", [
    (2, lambda r: "not json", "corrupt"),
    (1, lambda r: _set(r, "kl", r["kl"][:-1]), "'kl' must be a list of 8"),
    (2, lambda r: _set(r, "kl", [math.nan] + r["kl"][1:]), r"'kl'\[0\] = nan"),
    (1, lambda r: _set(r, "kl", [-0.5] + r["kl"][1:]), "finite KL >= 0"),
    (1, lambda r: _set(r, "margin", r["margin"][:3] + [math.inf] + r["margin"][4:]), r"'margin'\[3\] = inf"),
    (2, lambda r: _set(r, "correct", [2] + r["correct"][1:]), "0 or 1"),
    (1, lambda r: _set(r, "default_correct", True), "'default_correct'"),
    (1, lambda r: _set(r, "default_scores", [0.1]), "'default_scores'"),
    (2, lambda r: _set(r, "id", "mc-0"), "repeats line 1"),
    (1, lambda r: _set(r, "num_blocks", 3), "a candidate skips block 4"),
    (3, lambda r: _set(r, "margin", [0.0] * 8), "label fields"),
    (3, lambda r: _set(r, "mode", "answers"), "mode 'answers'"),
    (3, lambda r: _set(r, "routing_tokens", []), "routing_tokens"),
    (3, lambda r: r.pop("id") and None, "'id'"),
    (2, lambda r: r.pop("id") and None, "corrupt"),
    (3, lambda r: "[1, 2]", "corrupt damage record"),
])
def test_corrupt_lines_are_refused_naming_file_and_line(written, tmp_path, line, corrupt, message):
    out = tmp_path / "bad.jsonl"
    settings_path(out).write_text(settings_path(written).read_text())
    lines = written.read_text().splitlines()
    rec = json.loads(lines[line - 1])
    text = corrupt(rec)
    lines[line - 1] = text if isinstance(text, str) else json.dumps(rec)
    out.write_text("\n".join(lines) + "\n")
    with pytest.raises(ArtifactError, match=message) as info:
        read_damage(out)
    assert f"bad.jsonl:{line}" in str(info.value) and "\n" not in str(info.value)


def test_files_without_damage_settings_are_refused(written, tmp_path):
    out = tmp_path / "d.jsonl"
    with pytest.raises(ArtifactError, match="file not found"):
        read_damage(out)
    out.write_text(written.read_text())
    with pytest.raises(ArtifactError, match="no d.jsonl.settings.json"):
        read_damage(out)
    settings = json.loads(settings_path(written).read_text())
    settings_path(out).write_text(json.dumps({**settings, "kind": "skip probe"}))
    with pytest.raises(ArtifactError, match="not the settings of damage targets"):
        read_damage(out)
    settings_path(out).write_text(json.dumps({**settings, "candidates": [[3, 1]]}))
    with pytest.raises(ArtifactError, match="candidate 0"):
        read_damage(out)
    settings_path(out).write_text(json.dumps({**settings, "mode": "label-free"}))
    with pytest.raises(ArtifactError, match=r"d.jsonl:1: mode 'choices'"):  # a labelled record in a label-free file
        read_damage(out)
