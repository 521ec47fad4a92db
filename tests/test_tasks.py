"""drllm.tasks: loaders (real and synthetic data, both ARC schemas), source
resolution, errors, prompts."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest

from drllm.tasks import (
    DATA_DIR_ENV,
    DataFormatError,
    DataUnavailableError,
    Example,
    cloze_requests,
    generation_prompt,
    gsm8k_gold,
    last_boxed,
    load_jsonl,
    load_task,
)
from tiny_tokenizer import make_tiny_tokenizer

REAL = Path(__file__).resolve().parents[1].parent / "shared" / "data"
needs_real = pytest.mark.skipif(not (REAL / "arc_easy").is_dir(), reason="real data (../shared/data) absent")


def write_jsonl(path: Path, records) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


ARC_OFFICIAL = {
    "id": "q1",
    "question": {
        "stem": "Which gas do plants absorb?",
        "choices": [
            {"text": "oxygen", "label": "A"},
            {"text": "carbon dioxide", "label": "B"},
            {"text": "helium", "label": "C"},
            {"text": "neon", "label": "D"},
        ],
    },
    "answerKey": "B",
}
ARC_HF = {
    "id": "q2",
    "question": "What is frozen water?",
    "choices": {"text": ["steam", "ice", "mist"], "label": ["A", "B", "C"]},
    "answerKey": "B",
}
ARC_NUMERIC = {
    "id": "q3",
    "question": {
        "stem": "Pick the third.",
        "choices": [{"text": t, "label": str(i + 1)} for i, t in enumerate(["one", "two", "three", "four", "five"])],
    },
    "answerKey": "3",
}
ARC_HF_NUMERIC = {
    "id": "q4",
    "question": "Pick the first.",
    "choices": {"text": ["x", "y"], "label": ["1", "2"]},
    "answerKey": "1",
}
GSM = {"question": "Tom has 1,000 apples and eats 1. How many?", "answer": "1000-1=<<1000-1=999>>999\n#### 999"}
MATH = {
    "id": "train/algebra/1.json",
    "problem": "Compute $1/2$.",
    "level": "Level 2",
    "type": "Algebra",
    "solution": "It is $\\boxed{\\frac{1}{2}}$, not \\boxed{3}... so $\\boxed{\\frac{1}{2}}$.",
}


# ---------------------------------------------------------------- synthetic


def test_arc_both_schemas_and_numeric_labels(tmp_path):
    f = write_jsonl(tmp_path / "arc.jsonl", [ARC_OFFICIAL, ARC_HF, "", ARC_NUMERIC, ARC_HF_NUMERIC])
    exs = load_jsonl(f, "arc_easy")
    assert [e.id for e in exs] == ["q1", "q2", "q3", "q4"]
    a, b, c, d = exs
    assert a == Example(
        id="q1",
        task="arc_easy",
        question="Which gas do plants absorb?",
        answer="B",
        choices=("oxygen", "carbon dioxide", "helium", "neon"),
        labels=("A", "B", "C", "D"),
        gold_index=1,
    )
    assert b.choices == ("steam", "ice", "mist") and b.gold_index == 1 and b.question == "What is frozen water?"
    assert c.labels == ("1", "2", "3", "4", "5") and c.gold_index == 2 and c.answer == "3"
    assert d.labels == ("1", "2") and d.gold_index == 0
    assert all(e.is_multiple_choice for e in exs)


def test_gsm8k_and_math_synthetic(tmp_path):
    g = load_jsonl(write_jsonl(tmp_path / "g.jsonl", [GSM]), "gsm8k")[0]
    assert g.answer == "999" and g.id == "gsm8k/0" and g.solution == GSM["answer"] and not g.choices
    m = load_jsonl(write_jsonl(tmp_path / "m.jsonl", [MATH]), "math")[0]
    assert m.answer == "\\frac{1}{2}" and m.level == 2 and m.subject == "Algebra" and m.id == MATH["id"]


def test_math_level_filter(tmp_path):
    recs = [dict(MATH, id=f"m{i}", level=f"Level {1 + i % 5}") for i in range(10)]
    recs.append(dict(MATH, id="unknown", level="Level ?"))
    f = write_jsonl(tmp_path / "m.jsonl", recs)
    assert [e.id for e in load_jsonl(f, "math", levels=3)] == ["m2", "m7"]
    assert {e.level for e in load_jsonl(f, "math", levels=[1, 5])} == {1, 5}
    assert len(load_jsonl(f, "math")) == 11
    assert len(load_jsonl(f, "math", levels=[1, 2], limit=3)) == 3
    with pytest.raises(ValueError):
        load_jsonl(f, "math", levels=[6])
    with pytest.raises(ValueError):
        load_task("gsm8k", data_dir=tmp_path, levels=1)


@pytest.mark.parametrize(
    "bad, task, needle",
    [
        ('{"id": "x", "question": ', "arc_easy", "invalid JSON"),
        ({"id": "x", "question": {"stem": "q", "choices": [{"text": "a", "label": "A"}]}}, "arc_easy", "answerKey"),
        (dict(ARC_OFFICIAL, answerKey="E"), "arc_challenge", "not one of the labels"),
        ({"id": "x", "question": "q", "choices": {"text": ["a"], "label": ["A", "B"]}, "answerKey": "A"}, "arc_easy", "differ"),
        ({"question": "q", "answer": "no marker 5"}, "gsm8k", "####"),
        ({"answer": "#### 5"}, "gsm8k", "question"),
        (dict(MATH, solution="no box"), "math", "boxed"),
        ("[1, 2]", "math", "JSON object"),
    ],
)
def test_malformed_line_names_file_and_line(tmp_path, bad, task, needle):
    good = {"arc_easy": ARC_OFFICIAL, "arc_challenge": ARC_OFFICIAL, "gsm8k": GSM, "math": MATH}[task]
    f = write_jsonl(tmp_path / "bad.jsonl", [good, "", good, bad, good])
    with pytest.raises(DataFormatError) as info:
        load_jsonl(f, task)
    err = info.value
    assert isinstance(err, ValueError)
    assert err.line == 4 and err.path == str(f)
    assert f"{f}:4:" in str(err) and needle in str(err)


def test_unknown_task_and_missing_file(tmp_path):
    with pytest.raises(ValueError, match="arc_easy"):
        load_task("hellaswag", data_dir=tmp_path)
    with pytest.raises(DataUnavailableError):
        load_jsonl(tmp_path / "nope.jsonl", "gsm8k")


# ---------------------------------------------------------------- resolution


@pytest.fixture
def fake_hub(monkeypatch):
    """A stand-in ``datasets`` module; records what was asked for."""
    calls = []
    module = types.ModuleType("datasets")

    def load_dataset(name, config=None, split=None):
        calls.append((name, config, split))
        if name == "allenai/ai2_arc":
            return [ARC_HF]
        if name == "EleutherAI/hendrycks_math":
            return [{k: v for k, v in MATH.items() if k != "id"}]
        raise ConnectionError("no network")

    module.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "datasets", module)
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    return calls


def test_resolution_order(tmp_path, monkeypatch, fake_hub):
    explicit = tmp_path / "explicit"
    env = tmp_path / "env"
    write_jsonl(explicit / "arc_easy" / "validation.jsonl", [ARC_OFFICIAL])
    write_jsonl(env / "arc_easy" / "validation.jsonl", [ARC_HF])
    monkeypatch.setenv(DATA_DIR_ENV, str(env))
    assert load_task("arc_easy", data_dir=explicit)[0].id == "q1"  # explicit first
    assert load_task("arc_easy")[0].id == "q2"  # then the env var
    assert load_task("arc_easy", "validation", path=explicit / "arc_easy" / "validation.jsonl")[0].id == "q1"
    assert fake_hub == []
    # explicit data_dir is strict: no fall-through to env, embedded copy or hub
    with pytest.raises(DataUnavailableError, match="arc_challenge/validation.jsonl"):
        load_task("arc_challenge", data_dir=explicit)
    # env dir lacking the file -> the embedded copy, where it holds the items asked for
    assert len(load_task("arc_challenge")) == 299 and len(load_task("arc_easy", "train", limit=500)) == 500
    assert fake_hub == []
    # -> else the hub
    exs = load_task("arc_challenge", "train")
    assert fake_hub == [("allenai/ai2_arc", "ARC-Challenge", "train")]
    assert exs[0].id == "q2" and exs[0].task == "arc_challenge"
    load_task("arc_easy", "train", limit=501)
    assert fake_hub[-1] == ("allenai/ai2_arc", "ARC-Easy", "train")


def test_embedded_copy_is_the_shipped_prefix_of_each_split():
    from drllm.tasks import EMBEDDED
    from drllm.tasks.data import EMBEDDED_DIR

    for (task, split), held in EMBEDDED.items():
        lines = (EMBEDDED_DIR / task / f"{split}.jsonl").read_text().splitlines(keepends=True)
        assert len(lines) == (held or {"arc_easy": 570, "arc_challenge": 299}[task])
        if (REAL / task).is_dir():  # lines unchanged from the source files
            source = (REAL / task / f"{split}.jsonl").read_text().splitlines(keepends=True)
            assert lines == source[: len(lines)] and (held is not None or len(lines) == len(source))


def test_errors_name_every_place_looked(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # no hub
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    with pytest.raises(DataUnavailableError) as info:
        load_task("arc_easy", "train")  # the embedded copy holds 500 of its items
    msg = str(info.value)
    assert "the embedded copy holds the first 500 items of arc_easy/train, not all" in msg
    assert "Hugging Face hub (allenai/ai2_arc): the 'datasets' package is not installed" in msg
    assert f"set the {DATA_DIR_ENV}" in msg
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path))
    with pytest.raises(DataUnavailableError) as info:
        load_task("gsm8k", "test")
    msg = str(info.value)
    assert f"{DATA_DIR_ENV} has no {tmp_path / 'gsm8k' / 'test.jsonl'}" in msg
    assert "embedded copy holds only arc_easy/train" in msg and "hub (openai/gsm8k)" in msg
    # the variable is already set: say where to add the file, not to set it
    assert f"set the {DATA_DIR_ENV}" not in msg and f"Add gsm8k/test.jsonl to {tmp_path}" in msg
    assert "\n" not in msg


def test_hub_concatenates_math_configs_and_synthesises_ids(fake_hub):
    exs = load_task("math", "test", levels=[2])
    assert len(exs) == 7 and len(fake_hub) == 7
    assert all(split == "test" for _, _, split in fake_hub)
    assert len({e.id for e in exs}) == 7 and exs[0].answer == "\\frac{1}{2}"


def test_unreachable_hub_says_how_to_provide_data(fake_hub):
    with pytest.raises(DataUnavailableError) as info:
        load_task("gsm8k", "test")
    msg = str(info.value)
    assert "--data-dir" in msg and DATA_DIR_ENV in msg and "gsm8k/test.jsonl" in msg
    assert "openai/gsm8k" in msg


def test_missing_datasets_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    with pytest.raises(DataUnavailableError, match="pip install datasets") as info:
        load_task("arc_easy", "test")
    assert "--data-dir" in str(info.value)


# ---------------------------------------------------------------- real data


@needs_real
@pytest.mark.parametrize(
    "task, split, n",
    [("arc_easy", "validation", 570), ("arc_easy", "train", 2251), ("arc_challenge", "validation", 299),
     ("arc_challenge", "train", 1119), ("gsm8k", "train", 7473), ("math", "train", 7500)],
)
def test_real_data(task, split, n):
    exs = load_task(task, split, data_dir=REAL)
    assert len(exs) == n
    assert len({e.id for e in exs}) == n
    for e in exs:
        assert e.task == task and e.question
        # two MATH train solutions end in an empty \boxed{} (number_theory/7115, 7117): kept, unanswerable
        assert e.answer or (task == "math" and e.id.startswith("train/number_theory/71"))
        if task.startswith("arc"):
            assert 3 <= len(e.choices) <= 5 and e.labels[e.gold_index] == e.answer
            assert e.labels in (tuple("ABCDE"[: len(e.labels)]), tuple("12345"[: len(e.labels)]))


@needs_real
def test_real_data_details(monkeypatch):
    monkeypatch.setenv(DATA_DIR_ENV, str(REAL))
    arc = load_task("arc_easy")  # default split: validation, via the env var
    assert len(arc) == 570
    assert any(e.labels[0] == "1" for e in arc)  # numeric labels exist
    g = load_task("gsm8k", limit=1)[0]
    assert g.answer == "72"
    m = load_task("math", levels=1)
    assert len(m) == 564 and all(e.level == 1 for e in m)
    assert load_task("math", limit=1)[0].answer == "0"


# ---------------------------------------------------------------- helpers, prompts


def test_gold_helpers():
    assert last_boxed("a \\boxed{x} b \\boxed{\\frac{\\sqrt{2}}{2}} c") == "\\frac{\\sqrt{2}}{2}"
    assert last_boxed("\\fbox{4}") == "4" and last_boxed("\\boxed 5$") == "5"
    assert last_boxed("\\boxed{1} \\boxed{unbalanced") == "1"
    assert last_boxed("nothing") is None
    assert gsm8k_gold("x\n#### 1,234") == "1234" and gsm8k_gold("no") is None


def _arc(labels=("A", "B", "C")):
    return Example(id="x", task="arc_easy", question="Q?", answer=labels[1], choices=("a1", "b2", "c3"),
                   labels=labels, gold_index=1)


def test_prompts_plain_and_chat():
    ex = _arc(("1", "2", "3"))
    base = make_tiny_tokenizer(chat_template=False)
    p = generation_prompt(ex, base)
    assert p == "Question: Q?\nA. a1\nB. b2\nC. c3\nAnswer with the letter of the correct choice.\nAnswer:"
    assert "1. a1" in generation_prompt(ex, None, letters=False)
    chat = make_tiny_tokenizer()
    c = generation_prompt(ex, chat)
    assert c.startswith("<|im_start|>user\nQ?\nA. a1\n") and c.endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert generation_prompt(ex, chat, style="plain") == p
    with pytest.raises(ValueError):
        generation_prompt(ex, base, style="chat")
    g = Example(id="g", task="gsm8k", question="1+1?", answer="2")
    assert "####" in generation_prompt(g, base) and generation_prompt(g, base).endswith("Question: 1+1?\nAnswer:")
    m = Example(id="m", task="math", question="1+1?", answer="2")
    assert "\\boxed{}" in generation_prompt(m, chat)


def test_cloze_requests_match_lm_eval():
    ctx, conts = cloze_requests(_arc())
    assert ctx == "Question: Q?\nAnswer:" and conts == [" a1", " b2", " c3"]
    # a chat tokenizer does not change the default (plain) cloze formulation
    assert cloze_requests(_arc(), make_tiny_tokenizer()) == (ctx, conts)
    cctx, cconts = cloze_requests(_arc(), make_tiny_tokenizer(), style="auto")
    assert cctx.endswith("<|im_start|>assistant\n") and "Question: Q?\nAnswer:" in cctx and cconts == ["a1", "b2", "c3"]
    with pytest.raises(ValueError):
        cloze_requests(Example(id="g", task="gsm8k", question="q", answer="1"))
