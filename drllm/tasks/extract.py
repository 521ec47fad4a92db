"""Answer extraction from generated text, and correctness checks.

* ARC: :func:`extract_choice` finds the chosen option in free text ("B",
  "B.", "(B)", "b) because...", "Answer: B", "The answer is B", numeric labels,
  "... final answer: B" after hedging).
* MATH: :func:`extract_math_answer` takes the last ``\\boxed{}`` (nested
  braces); :func:`math_equal` checks symbolic equivalence with ``math-verify``.
* GSM8K: :func:`extract_gsm8k_answer` takes the final number (after ``####``
  if present, else in ``\\boxed{}``, else after "answer is", else the last
  number), handling commas, ``$``, signs and decimals.
"""

from __future__ import annotations

import re
import threading
from decimal import Decimal, InvalidOperation
from typing import Sequence

from .data import Example, last_boxed

__all__ = [
    "extract_choice",
    "extract_math_answer",
    "extract_gsm8k_answer",
    "normalize_number",
    "math_equal",
    "numbers_equal",
    "extract_answer",
    "is_correct",
]

_LETTERS = "ABCDEFGHIJ"

# --------------------------------------------------------------------------
# ARC / multiple choice


def _label_map(labels: Sequence[str]) -> dict[str, int]:
    """Upper-cased token -> choice index. Numeric labels (1-5) also accept the
    letter of the same position (a model shown "1." may still say "A")."""
    m: dict[str, int] = {}
    for i, lab in enumerate(labels):
        m.setdefault(str(lab).strip().upper(), i)
    if labels and all(str(lab).strip().isdigit() for lab in labels):
        for i in range(min(len(labels), len(_LETTERS))):
            m.setdefault(_LETTERS[i], i)
    return m


_TOK = r"(?P<tok>[A-Za-z]|\d{1,2})(?![A-Za-z0-9])"
# Each run of separators is consumed by exactly one quantifier (no nested or
# adjacent overlapping ones), so matching stays linear on long whitespace runs.
_SEP = r"[\s*]*"
_ANCHOR = re.compile(
    r"\b(?:final\s+answer|(?:correct|right|best)\s+(?:answer|option|choice)|answer|option|choice)\b" + _SEP
    + r"(?:(?:is|would\s+be|should\s+be|will\s+be|must\s+be)\b" + _SEP + r")?"
    + r"(?:[:\-=]" + _SEP + r")?"
    + r"(?:(?:option|choice|letter)\b" + _SEP + r")?"
    + r"(?:(?P<open>[(\[{])\s*)?" + _TOK + r"(?:\s*(?P<close>[)\]}]))?",
    re.IGNORECASE,
)
_START = re.compile(r"^[\s*#>]*(?:(?P<open>[(\[{])\s*)?" + _TOK + r"(?:\s*(?P<close>[)\]}]))?")
_BRACKETED = re.compile(r"[(\[]\s*(?P<tok>[A-Za-z]|\d{1,2})\s*[)\]]")
_BARE_UPPER = re.compile(r"(?<![A-Za-z0-9'])(?P<tok>[A-Z])(?![A-Za-z0-9'])(?P<after>\S?)")
# words after a bare leading label that still make it an answer ("B because ...")
_AFTER_LABEL_WORDS = re.compile(r"^\s+(?:is|because|since|as|it|-|–|—|would|should|seems)\b", re.IGNORECASE)


def _accept(tok: str, bracketed: bool, rest: str) -> bool:
    """Reject a bare lower-case letter (or the article "A") followed by a word:
    "a bit", "A plant ..." are prose, "b." or "A because" are answers."""
    if bracketed or tok.isdigit():
        return True
    if tok.islower() or tok == "A":
        if re.match(r"^\s+[A-Za-z]", rest) and not _AFTER_LABEL_WORDS.match(rest):
            return False
    return True


def extract_choice(
    text: str,
    labels: Sequence[str] = ("A", "B", "C", "D", "E"),
    choices: Sequence[str] | None = None,
) -> int | None:
    """Index of the option chosen in ``text`` (``None`` if none is found).

    Order of evidence: the last "answer is X" / "answer: X" / "option X"
    phrase; the last ``\\boxed{X}``; a label at the very start ("B", "(b)",
    "B) because"); a single distinct bracketed label "(C)" anywhere; the text
    of exactly one choice (when ``choices`` is given); a single distinct bare
    capital-letter label.
    """
    if not text:
        return None
    lmap = _label_map(labels)
    t = text.replace("**", "").replace("__", "")

    def look(tok: str) -> int | None:
        return lmap.get(tok.upper())

    # 1. anchored phrases, last one wins
    found = None
    for m in _ANCHOR.finditer(t):
        idx = look(m.group("tok"))
        if idx is None:
            continue
        bracketed = bool(m.group("open") or m.group("close"))
        if _accept(m.group("tok"), bracketed, t[m.end("tok") :]):
            found = idx
    if found is not None:
        return found

    # 2. \boxed{X}
    boxed = last_boxed(t)
    if boxed is not None:
        inner = re.sub(r"\\text\{(.*)\}", r"\1", boxed).strip().strip("()").strip()
        if look(inner) is not None:
            return look(inner)

    # 3. a label at the start
    m = _START.match(t)
    if m is not None and look(m.group("tok")) is not None:
        bracketed = bool(m.group("open") or m.group("close"))
        if _accept(m.group("tok"), bracketed, t[m.end("tok") :]):
            return look(m.group("tok"))

    # 4. bracketed labels anywhere, if they agree
    hits = {look(x.group("tok")) for x in _BRACKETED.finditer(t)} - {None}
    if len(hits) == 1:
        return hits.pop()

    # 5. the text of exactly one choice
    if choices:
        low = t.lower()
        present = [i for i, c in enumerate(choices) if c and re.search(r"(?<!\w)" + re.escape(c.lower()) + r"(?!\w)", low)]
        if len(present) == 1:
            return present[0]
        if len(present) > 1:  # e.g. one choice's text contains another's
            longest = max(present, key=lambda i: len(choices[i]))
            if all(choices[i].lower() in choices[longest].lower() for i in present):
                return longest

    # 6. bare capital letters that are labels, if they agree
    hits = set()
    for x in _BARE_UPPER.finditer(t):
        tok, after = x.group("tok"), x.group("after")
        if tok == "A" and after not in (".", ")", ":", ",", ""):
            continue
        if tok == "A" and after == "" and re.match(r"\s+[a-z]", t[x.end("tok") :]):
            continue
        idx = look(tok)
        if idx is not None and (not tok.isalpha() or not all(lab.isdigit() for lab in labels)):
            hits.add(idx)
    if len(hits) == 1:
        return hits.pop()
    return None


# --------------------------------------------------------------------------
# numbers (GSM8K)

_NUM = re.compile(
    r"(?<![\w.])(?P<sign>[-−–]?)\s?\$?\s?(?P<num>\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)(?![\d])"
)


def normalize_number(s: str) -> str | None:
    """Canonical string of a number: commas, ``$``, spaces and trailing zeros
    removed (``"$1,000.50"`` -> ``"1000.5"``, ``"-3.0"`` -> ``"-3"``)."""
    if s is None:
        return None
    s = s.strip().replace("−", "-").replace("–", "-")
    s = re.sub(r"[,$\s]", "", s).rstrip(".")
    s = re.sub(r"^(-?)\\\$", r"\1", s)
    try:
        d = Decimal(s)
    except InvalidOperation:
        return None
    if not d.is_finite():
        return None
    if d == d.to_integral_value():
        return str(int(d))
    return format(d.normalize(), "f")


def _last_number(text: str) -> str | None:
    last = None
    for m in _NUM.finditer(text):
        sign = "-" if m.group("sign") else ""
        last = sign + m.group("num")
    return normalize_number(last) if last is not None else None


def extract_gsm8k_answer(text: str) -> str | None:
    """Final numeric answer of a GSM8K-style solution, as a canonical number
    string (see :func:`normalize_number`), or ``None``."""
    if not text:
        return None
    idx = text.rfind("####")
    if idx >= 0:
        n = _last_number_first(text[idx + 4 :])
        if n is not None:
            return n
    boxed = last_boxed(text)
    if boxed is not None:
        n = _last_number(boxed.replace("\\$", "$").replace("\\!", "").replace("{,}", ","))
        if n is not None:
            return n
    ms = list(re.finditer(r"answer\s*(?:is|:|=)", text, re.IGNORECASE))
    if ms:
        n = _last_number_first(text[ms[-1].end() :])
        if n is not None:
            return n
    return _last_number(text)


def _last_number_first(tail: str) -> str | None:
    """First number of ``tail`` (the text right after an answer marker)."""
    m = _NUM.search(tail)
    if m is None:
        return None
    return normalize_number(("-" if m.group("sign") else "") + m.group("num"))


def numbers_equal(pred: str | None, gold: str | None, rel_tol: float = 1e-6) -> bool:
    a, b = normalize_number(pred) if pred else None, normalize_number(gold) if gold else None
    if a is None or b is None:
        return False
    if a == b:
        return True
    da, db = Decimal(a), Decimal(b)
    return abs(da - db) <= Decimal(str(rel_tol)) * max(abs(db), Decimal(1))


# --------------------------------------------------------------------------
# MATH

_ANSWER_IS = re.compile(r"\banswer\s*(?:is\b|:)(?:\s*:)?\s*(?P<ans>\$[^$]+\$|[^\n]+)", re.IGNORECASE)


def extract_math_answer(text: str) -> str | None:
    """The last ``\\boxed{...}`` of ``text`` (nested braces kept); failing
    that, what follows the last "answer is" / "answer:"; else ``None``."""
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    ms = list(_ANSWER_IS.finditer(text or ""))
    if ms:
        ans = ms[-1].group("ans").strip().rstrip(".").strip()
        if ans.startswith("$") and ans.endswith("$"):
            ans = ans.strip("$").strip()
        return ans or None
    return None


def _math_verify():
    try:
        from math_verify import parse, verify
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "checking MATH answers needs math-verify: pip install 'math-verify>=0.7'"
        ) from err
    return parse, verify


def _strip_dollars(s: str) -> str:
    s = s.strip()
    while len(s) >= 2 and s[0] == "$" and s[-1] == "$":
        s = s[1:-1].strip()
    return s


def math_equal(pred: str | None, gold: str | None) -> bool:
    """Whether two LaTeX answers are equivalent (``\\frac{1}{2}`` == ``0.5``),
    by math-verify; an identical normalised string is equal without it."""
    if pred is None or gold is None:
        return False
    p, g = _strip_dollars(pred), _strip_dollars(gold)
    if not p:
        return False
    if re.sub(r"\s+", "", p) == re.sub(r"\s+", "", g):
        return True
    parse, verify = _math_verify()
    # math-verify times out with SIGALRM, which only works on the main thread
    tmo = 5 if threading.current_thread() is threading.main_thread() else None
    try:
        gp = parse("\\boxed{" + g + "}", parsing_timeout=tmo)
        pp = parse("\\boxed{" + p + "}", parsing_timeout=tmo)
        if not gp or not pp:
            return False
        return bool(verify(gp, pp, timeout_seconds=tmo))
    except Exception:
        return False


# --------------------------------------------------------------------------
# dispatch


def extract_answer(example: Example, text: str) -> str | None:
    """The answer found in ``text`` for ``example``'s task, as a string: the
    chosen label for ARC, a number for GSM8K, LaTeX for MATH."""
    if example.choices:
        idx = extract_choice(text, example.labels, example.choices)
        return None if idx is None else example.labels[idx]
    if example.task == "gsm8k":
        return extract_gsm8k_answer(text)
    if example.task == "math":
        return extract_math_answer(text)
    raise ValueError(f"no answer extraction for task {example.task!r}")


def is_correct(example: Example, text: str) -> int:
    """1 if the generated ``text`` answers ``example`` correctly, else 0."""
    if example.choices:
        idx = extract_choice(text, example.labels, example.choices)
        return int(idx is not None and idx == example.gold_index)
    if example.task == "gsm8k":
        return int(numbers_equal(extract_gsm8k_answer(text), example.answer))
    if example.task == "math":
        return int(math_equal(extract_math_answer(text), example.answer))
    raise ValueError(f"no answer check for task {example.task!r}")
