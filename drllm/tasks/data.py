"""Task data: a uniform :class:`Example` and loaders for ARC, GSM8K and MATH.

Data can come from

* a local JSONL file (``path=``),
* a folder holding ``<task>/<split>.jsonl`` (``data_dir=`` or the
  ``DRLLM_DATA_DIR`` environment variable),
* the Hugging Face hub through ``datasets`` (imported lazily).

Resolution order for a task name: explicit ``data_dir``, else
``DRLLM_DATA_DIR``, else the hub. An explicit ``data_dir`` is strict (a missing
file is an error); a file missing from ``DRLLM_DATA_DIR`` falls through to the
hub.

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


def _how_to_provide(task: str, split: str) -> str:
    return (
        f"Provide the data locally: pass --data-dir DIR (data_dir=DIR) or set the "
        f"{DATA_DIR_ENV} environment variable to a folder holding "
        f"{task}/{split}.jsonl, or pass the path of a JSONL file (path=...)."
    )


def _load_hub(
    task: str,
    split: str,
    hf_name: str | None,
    hf_config: str | None,
) -> list[Mapping[str, Any]]:
    try:
        import datasets  # noqa: F401  (lazy: optional dependency)
    except ImportError as err:
        raise DataUnavailableError(
            f"cannot load {task!r} ({split}): no local data and the 'datasets' package is not "
            f"installed (pip install datasets). " + _how_to_provide(task, split)
        ) from err
    if hf_name is not None:
        name, configs = hf_name, (hf_config,)
    else:
        name, configs = HF_DATASETS[task]
    records: list[Mapping[str, Any]] = []
    try:
        for cfg in configs:
            ds = datasets.load_dataset(name, cfg, split=split)
            records.extend(ds)
    except Exception as err:  # network, missing split, offline mode...
        raise DataUnavailableError(
            f"cannot load {task!r} ({split}) from the Hugging Face hub dataset {name!r}: "
            f"{type(err).__name__}: {err}. " + _how_to_provide(task, split)
        ) from err
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
    when it holds the file); the hub (``hf_name``/``hf_config`` override the
    default dataset). ``levels`` keeps the given MATH levels (1..5); ``limit``
    keeps the first examples (after filtering).
    """
    _check_task(task)
    if levels is not None and task != "math":
        raise ValueError("levels= only applies to the 'math' task")
    split = split or DEFAULT_SPLITS[task]
    if path is not None:
        return load_jsonl(path, task, levels=levels, limit=limit)
    if data_dir is not None:
        file = Path(data_dir) / task / f"{split}.jsonl"
        if not file.is_file():
            raise DataUnavailableError(
                f"data_dir {str(data_dir)!r} has no {task}/{split}.jsonl (looked for {file})"
            )
        return load_jsonl(file, task, levels=levels, limit=limit)
    env_dir = os.environ.get(DATA_DIR_ENV)
    if env_dir:
        file = Path(env_dir) / task / f"{split}.jsonl"
        if file.is_file():
            return load_jsonl(file, task, levels=levels, limit=limit)
    records = _load_hub(task, split, hf_name, hf_config)
    source = f"{hf_name or HF_DATASETS[task][0]}:{split}"
    return examples_from_records(records, task, levels=levels, limit=limit, source=source)
