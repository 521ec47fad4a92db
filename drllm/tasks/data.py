"""Task data: a uniform :class:`Example` and loaders for ARC, GSM8K and MATH.

Data can come from

* a local JSONL file (``path=``),
* a folder holding ``<task>/<split>.jsonl`` (``data_dir=`` or the
  ``DRLLM_DATA_DIR`` environment variable),
* the copy embedded in the package (:data:`EMBEDDED`: the ARC items the demo
  needs, so it runs offline),
* the Hugging Face hub through ``datasets`` (imported lazily).

Resolution order for a task name: explicit ``data_dir``, else
``DRLLM_DATA_DIR``, else the embedded copy, else the hub. An explicit
``data_dir`` is strict (a missing file is an error); the others fall through,
and the final error names every place that was tried.

Both ARC schemas are accepted, line by line:

* official: ``{"id", "question": {"stem", "choices": [{"text", "label"}]}, "answerKey"}``
* Hugging Face ``allenai/ai2_arc``:
  ``{"id", "question", "choices": {"text": [...], "label": [...]}, "answerKey"}``
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

__all__ = [
    "TASKS",
    "ARC_TASKS",
    "DEFAULT_SPLITS",
    "HF_DATASETS",
    "DATA_DIR_ENV",
    "EMBEDDED",
    "Example",
    "DataFormatError",
    "DataUnavailableError",
    "load_task",
    "load_jsonl",
    "examples_from_records",
    "parse_record",
    "last_boxed",
    "gsm8k_gold",
]

ARC_TASKS = ("arc_easy", "arc_challenge")
TASKS = ARC_TASKS + ("gsm8k", "math")

DATA_DIR_ENV = "DRLLM_DATA_DIR"

EMBEDDED_DIR = Path(__file__).resolve().parent / "embedded"
#: What ships in ``embedded/<task>/<split>.jsonl`` (ARC, CC BY-SA 4.0; see its
#: README): (task, split) -> how many leading items of the split it holds,
#: None for all of them.
EMBEDDED: dict[tuple[str, str], int | None] = {
    ("arc_easy", "train"): 500,
    ("arc_easy", "validation"): None,
    ("arc_challenge", "validation"): None,
}

#: Split used when ``split=None``. Only ``train`` of GSM8K and MATH ships with
#: the development data (evaluate on a held-out slice of it).
DEFAULT_SPLITS = {
    "arc_easy": "validation",
    "arc_challenge": "validation",
    "gsm8k": "train",
    "math": "train",
}

#: Hub sources: (dataset name, list of configs). MATH is split by subject on
#: the hub; the configs are concatenated.
HF_DATASETS: dict[str, tuple[str, tuple[str | None, ...]]] = {
    "arc_easy": ("allenai/ai2_arc", ("ARC-Easy",)),
    "arc_challenge": ("allenai/ai2_arc", ("ARC-Challenge",)),
    "gsm8k": ("openai/gsm8k", ("main",)),
    "math": (
        "EleutherAI/hendrycks_math",
        (
            "algebra",
            "counting_and_probability",
            "geometry",
            "intermediate_algebra",
            "number_theory",
            "prealgebra",
            "precalculus",
        ),
    ),
}


class DataFormatError(ValueError):
    """A record that does not follow its task's schema.

    ``path`` and ``line`` (1-based) name where it is when it came from a file.
    """

    def __init__(self, message: str, path: str | os.PathLike | None = None, line: int | None = None):
        self.path = None if path is None else str(path)
        self.line = line
        self.reason = message
        where = ""
        if self.path is not None:
            where = f"{self.path}:{line}: " if line is not None else f"{self.path}: "
        elif line is not None:
            where = f"record {line}: "
        super().__init__(where + message)


class DataUnavailableError(FileNotFoundError):
    """No source for a task's data could be found or reached."""


@dataclass(frozen=True)
class Example:
    """One item of any task.

    ``answer`` is the gold answer as a string: the label for ARC (``"B"`` or
    ``"3"``), the final number for GSM8K (commas removed), the content of the
    last ``\\boxed{}`` for MATH (empty for the two MATH train items whose
    solution ends in an empty ``\\boxed{}``; nothing matches it). ``gold_index`` is the position of the correct
    choice (ARC only).
    """

    id: str
    task: str
    question: str
    answer: str
    choices: tuple[str, ...] = ()
    labels: tuple[str, ...] = ()
    gold_index: int | None = None
    level: int | None = None
    subject: str | None = None
    solution: str | None = None
    meta: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def is_multiple_choice(self) -> bool:
        return bool(self.choices)


# --------------------------------------------------------------------------
# answer helpers for gold data


def _matching_braces(text: str) -> dict[int, int]:
    """Index of each balanced ``{`` -> index of its ``}`` (one linear pass)."""
    stack: list[int] = []
    match: dict[int, int] = {}
    for j, c in enumerate(text):
        if c == "{":
            stack.append(j)
        elif c == "}" and stack:
            match[stack.pop()] = j
    return match


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) in ``text``,
    with nested braces; ``None`` if there is none or it is unbalanced.
    ``\\boxed 5`` (no braces) gives ``"5"``."""
    if not text:
        return None
    starts = list(re.finditer(r"\\(?:boxed|fbox)\b *", text))
    if not starts:
        return None
    match = None
    for m in reversed(starts):
        i = m.end()
        if i < len(text) and text[i] == "{":
            if match is None:
                match = _matching_braces(text)
            if i in match:
                return text[i + 1 : match[i]].strip()
            continue  # unbalanced: try an earlier one
        # "\boxed 5" form: up to the next space / $ / end
        m2 = re.match(r"[^\s$]+", text[i:])
        if m2:
            return m2.group(0).strip()
    return None


def gsm8k_gold(answer: str) -> str | None:
    """The final answer of a GSM8K solution: the number after ``#### ``."""
    idx = answer.rfind("####")
    if idx < 0:
        return None
    tail = answer[idx + 4 :].strip()
    if not tail:
        return None
    return tail.replace(",", "").replace("$", "").strip()


# --------------------------------------------------------------------------
# record parsing


def _require(rec: Mapping[str, Any], key: str, kind: type | tuple[type, ...] = str) -> Any:
    if key not in rec:
        raise DataFormatError(f"missing field {key!r}")
    value = rec[key]
    if not isinstance(value, kind):
        raise DataFormatError(f"field {key!r} should be {_kind_name(kind)}, got {type(value).__name__}")
    return value


def _kind_name(kind: type | tuple[type, ...]) -> str:
    if isinstance(kind, tuple):
        return " or ".join(k.__name__ for k in kind)
    return kind.__name__


def _parse_arc(rec: Mapping[str, Any], task: str, index: int) -> Example:
    q = rec.get("question")
    if isinstance(q, Mapping):  # official schema
        stem = _require(q, "stem")
        raw = q.get("choices")
        if not isinstance(raw, list) or not raw:
            raise DataFormatError("field 'question.choices' should be a non-empty list")
        texts, labels = [], []
        for c in raw:
            if not isinstance(c, Mapping) or "text" not in c or "label" not in c:
                raise DataFormatError("each choice needs 'text' and 'label'")
            texts.append(str(c["text"]))
            labels.append(str(c["label"]))
    elif isinstance(q, str):  # Hugging Face schema
        stem = q
        ch = rec.get("choices")
        if not isinstance(ch, Mapping) or "text" not in ch or "label" not in ch:
            raise DataFormatError("field 'choices' should be {'text': [...], 'label': [...]}")
        texts = [str(t) for t in ch["text"]]
        labels = [str(lab) for lab in ch["label"]]
        if len(texts) != len(labels) or not texts:
            raise DataFormatError("'choices.text' and 'choices.label' differ in length or are empty")
    else:
        raise DataFormatError("missing field 'question' (a string or an object with 'stem' and 'choices')")
    key = rec.get("answerKey")
    if key is None:
        raise DataFormatError("missing field 'answerKey'")
    key = str(key).strip()
    if key not in labels:
        raise DataFormatError(f"answerKey {key!r} is not one of the labels {labels}")
    if len(set(labels)) != len(labels):
        raise DataFormatError(f"duplicate choice labels {labels}")
    ex_id = str(rec.get("id", f"{task}/{index}"))
    return Example(
        id=ex_id,
        task=task,
        question=str(stem).strip(),
        answer=key,
        choices=tuple(t.strip() for t in texts),
        labels=tuple(labels),
        gold_index=labels.index(key),
    )


def _parse_gsm8k(rec: Mapping[str, Any], task: str, index: int) -> Example:
    question = _require(rec, "question")
    solution = _require(rec, "answer")
    gold = gsm8k_gold(solution)
    if gold is None:
        raise DataFormatError("field 'answer' has no final answer after '#### '")
    return Example(
        id=str(rec.get("id", f"{task}/{index}")),
        task=task,
        question=question.strip(),
        answer=gold,
        solution=solution,
    )


_LEVEL_RE = re.compile(r"(\d+)")


def _parse_level(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, int):
        return value
    m = _LEVEL_RE.search(str(value))
    return int(m.group(1)) if m else None  # "Level ?" -> None


def _parse_math(rec: Mapping[str, Any], task: str, index: int) -> Example:
    problem = _require(rec, "problem")
    solution = _require(rec, "solution")
    gold = rec.get("answer")
    if not isinstance(gold, str) or not gold.strip():
        gold = last_boxed(solution)
    if gold is None:
        raise DataFormatError("field 'solution' has no \\boxed{...} answer")
    return Example(
        id=str(rec.get("id", rec.get("unique_id", f"{task}/{index}"))),
        task=task,
        question=problem.strip(),
        answer=gold.strip(),
        level=_parse_level(rec.get("level")),
        subject=rec.get("type") or rec.get("subject"),
        solution=solution,
    )


_PARSERS = {
    "arc_easy": _parse_arc,
    "arc_challenge": _parse_arc,
    "gsm8k": _parse_gsm8k,
    "math": _parse_math,
}


def _check_task(task: str) -> str:
    if task not in _PARSERS:
        raise ValueError(f"unknown task {task!r}; supported tasks: {', '.join(TASKS)}")
    return task


def parse_record(rec: Any, task: str, index: int = 0) -> Example:
    """Turn one raw record (a dict) of ``task`` into an :class:`Example`.
    Raises :class:`DataFormatError` on a schema violation."""
    _check_task(task)
    if not isinstance(rec, Mapping):
        raise DataFormatError(f"expected a JSON object, got {type(rec).__name__}")
    return _PARSERS[task](rec, task, index)


def _filter_levels(examples: Iterable[Example], levels: int | Iterable[int] | None) -> list[Example]:
    if levels is None:
        return list(examples)
    wanted = {levels} if isinstance(levels, int) else {int(x) for x in levels}
    bad = [x for x in wanted if not 1 <= x <= 5]
    if bad:
        raise ValueError(f"MATH levels are 1..5, got {sorted(bad)}")
    return [e for e in examples if e.level in wanted]


def examples_from_records(
    records: Iterable[Mapping[str, Any]],
    task: str,
    *,
    levels: int | Iterable[int] | None = None,
    limit: int | None = None,
    source: str | None = None,
) -> list[Example]:
    """Parse in-memory records (e.g. a ``datasets.Dataset``). A bad record's
    error names ``source`` and its 1-based position."""
    _check_task(task)
    if levels is not None and task != "math":
        raise ValueError("levels= only applies to the 'math' task")
    out = []
    for i, rec in enumerate(records):
        try:
            out.append(parse_record(rec, task, i))
        except DataFormatError as err:
            raise DataFormatError(err.reason, path=source, line=i + 1) from None
    out = _filter_levels(out, levels) if task == "math" else out
    return out[:limit] if limit is not None else out


def _iter_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as err:
                raise DataFormatError(f"invalid JSON: {err.msg} (column {err.colno})", path, lineno) from None


def load_jsonl(
    path: str | os.PathLike,
    task: str,
    *,
    levels: int | Iterable[int] | None = None,
    limit: int | None = None,
) -> list[Example]:
    """Load a local JSONL file of ``task``. A malformed line raises
    :class:`DataFormatError` naming the file and the line number."""
    _check_task(task)
    if levels is not None and task != "math":
        raise ValueError("levels= only applies to the 'math' task")
    path = Path(path)
    if not path.is_file():
        raise DataUnavailableError(f"no such data file: {path}")
    out = []
    count = 0
    for lineno, rec in _iter_jsonl(path):
        try:
            ex = parse_record(rec, task, count)
        except DataFormatError as err:
            raise DataFormatError(err.reason, path, lineno) from None
        count += 1
        out.append(ex)
    if task == "math":
        out = _filter_levels(out, levels)
    return out[:limit] if limit is not None else out


def _embedded_file(task: str, split: str, limit: int | None) -> Path | None:
    """The embedded JSONL of ``task/split`` when it holds the ``limit`` items asked for."""
    if (task, split) not in EMBEDDED:
        return None
    held = EMBEDDED[task, split]
    if held is not None and (limit is None or limit > held):
        return None
    return EMBEDDED_DIR / task / f"{split}.jsonl"


def _embedded_miss(task: str, split: str, limit: int | None) -> str:
    """Why the embedded copy cannot serve ``task/split`` (for the final error)."""
    held = EMBEDDED.get((task, split))
    if held is not None:
        return f"the embedded copy holds the first {held} items of {task}/{split}, not {limit or 'all'}"
    return f"the embedded copy holds only {', '.join(f'{t}/{s}' for t, s in EMBEDDED)}"


def _how_to_provide(task: str, split: str, env_dir: str | None) -> str:
    # with the variable already set, telling the user to set it would send them in a circle
    if env_dir:
        return (f"Add {task}/{split}.jsonl to {env_dir}, or pass --data-dir DIR (data_dir=DIR) "
                f"or the path of a JSONL file (path=...).")
    return (f"Provide the data locally: pass --data-dir DIR (data_dir=DIR) or set the {DATA_DIR_ENV} "
            f"environment variable to a folder holding {task}/{split}.jsonl, or pass the path of a JSONL "
            f"file (path=...).")


def _load_hub(task: str, split: str, hf_name: str | None, hf_config: str | None,
              looked: list[str], env_dir: str | None) -> list[Mapping[str, Any]]:
    """Records of ``task/split`` from the hub; the error lists ``looked`` (the places tried before)."""
    name, configs = (hf_name, (hf_config,)) if hf_name is not None else HF_DATASETS[task]

    def unavailable(reason: str) -> DataUnavailableError:
        places = "; ".join([*looked, f"the Hugging Face hub ({name}): {reason}"])
        return DataUnavailableError(f"cannot load {task}/{split}: {places}. {_how_to_provide(task, split, env_dir)}")

    try:
        import datasets  # lazy: optional dependency
    except ImportError as err:
        raise unavailable("the 'datasets' package is not installed (pip install datasets)") from err
    records: list[Mapping[str, Any]] = []
    try:
        for cfg in configs:
            records.extend(datasets.load_dataset(name, cfg, split=split))
    except Exception as err:  # network, missing split, offline mode...
        reason = " ".join(f"{type(err).__name__}: {err}".split())  # one line
        raise unavailable(reason[:300]) from err
    return records


def load_task(
    task: str,
    split: str | None = None,
    *,
    data_dir: str | os.PathLike | None = None,
    path: str | os.PathLike | None = None,
    hf_name: str | None = None,
    hf_config: str | None = None,
    levels: int | Iterable[int] | None = None,
    limit: int | None = None,
) -> list[Example]:
    """Load ``task`` (``arc_easy``, ``arc_challenge``, ``gsm8k`` or ``math``).

    Sources, first that applies: ``path`` (a JSONL file); ``data_dir`` (strict:
    ``<data_dir>/<task>/<split>.jsonl`` must exist); ``$DRLLM_DATA_DIR`` (used
    when it holds the file); the embedded copy (when it holds the items asked
    for and no ``hf_name`` is given); the hub (``hf_name``/``hf_config``
    override the default dataset). ``levels`` keeps the given MATH levels
    (1..5); ``limit`` keeps the first examples (after filtering).
    """
    _check_task(task)
    if levels is not None and task != "math":
        raise ValueError("levels= only applies to the 'math' task")
    split = split or DEFAULT_SPLITS[task]
    load = lambda file: load_jsonl(file, task, levels=levels, limit=limit)  # noqa: E731
    if path is not None:
        return load(path)
    if data_dir is not None:
        file = Path(data_dir) / task / f"{split}.jsonl"
        if not file.is_file():
            raise DataUnavailableError(f"--data-dir {data_dir} has no {task}/{split}.jsonl (looked for {file})")
        return load(file)
    looked = []
    env_dir = os.environ.get(DATA_DIR_ENV)
    if env_dir:
        file = Path(env_dir) / task / f"{split}.jsonl"
        if file.is_file():
            return load(file)
        looked.append(f"{DATA_DIR_ENV} has no {file}")
    if hf_name is None:
        file = _embedded_file(task, split, limit)
        if file is not None:
            return load(file)
        looked.append(_embedded_miss(task, split, limit))
    records = _load_hub(task, split, hf_name, hf_config, looked, env_dir)
    source = f"{hf_name or HF_DATASETS[task][0]}:{split}"
    return examples_from_records(records, task, levels=levels, limit=limit, source=source)
