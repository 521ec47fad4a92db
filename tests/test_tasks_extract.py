"""drllm.tasks answer extraction: ARC letters, GSM8K numbers, MATH boxed +
math-verify."""

from __future__ import annotations

import threading

import pytest

from drllm.tasks import (
    Example,
    extract_answer,
    extract_choice,
    extract_gsm8k_answer,
    extract_math_answer,
    generation_rewards,
    is_correct,
    math_equal,
    normalize_number,
    numbers_equal,
)

try:
    import math_verify  # noqa: F401

    HAVE_MATH_VERIFY = True
except ImportError:  # pragma: no cover
    HAVE_MATH_VERIFY = False
needs_math_verify = pytest.mark.skipif(not HAVE_MATH_VERIFY, reason="math-verify not installed")

ABCD = ("A", "B", "C", "D")
NUM = ("1", "2", "3", "4")


@pytest.mark.parametrize(
    "text, want",
    [
        ("B", "B"),
        ("B.", "B"),
        ("(B)", "B"),
        ("[C]", "C"),
        ("b", "B"),
        ("c.", "C"),
        ("(d)", "D"),
        ("  D\n", "D"),
        ("B) because plants need light", "B"),
        ("B because plants need light", "B"),
        ("C: the moon", "C"),
        ("Answer: B", "B"),
        ("answer: (c)", "C"),
        ("ANSWER:D", "D"),
        ("The answer is B", "B"),
        ("The answer is B.", "B"),
        ("the answer is (a).", "A"),
        ("The correct answer is: C", "C"),
        ("The correct option is D because it is heavier.", "D"),
        ("Option C", "C"),
        ("I choose option B.", "B"),
        ("The answer is **C**", "C"),
        ("**Answer:** A", "A"),
        ("I think it is A or B... final answer: B", "B"),
        ("A seems plausible, but C is wrong. The answer is D", "D"),
        ("The answer is a bit tricky. Final answer: C", "C"),
        ("Answer: B\nAnswer: C", "C"),
        ("\\boxed{C}", "C"),
        ("So we get $\\boxed{\\text{B}}$", "B"),
        ("Between the options, (D) fits best.", "D"),
        ("A", "A"),
        ("A.", "A"),
        ("A because it reflects light", "A"),
        ("A plant makes its food, so carbon dioxide.", "B"),  # article, then the choice text
        ("It must be carbon dioxide.", "B"),  # only the choice text
        ("I would say C.", "C"),
        ("", None),
        ("I don't know.", None),
        ("Either (A) or (B).", None),  # ambiguous: no credit
        ("E", None),  # not a label of this item
        ("a plant", None),
    ],
)
def test_extract_choice_letters(text, want):
    choices = ("oxygen", "carbon dioxide", "helium", "neon")
    got = extract_choice(text, ABCD, choices)
    assert got == (None if want is None else ABCD.index(want)), text


@pytest.mark.parametrize(
    "text, want",
    [
        ("3", 2),
        ("3.", 2),
        ("(4)", 3),
        ("Answer: 2", 1),
        ("The answer is 1", 0),
        ("2) because", 1),
        ("B", 1),  # a letter maps to the position when labels are 1-5
        ("The answer is (c)", 2),
        ("7", None),
        ("nothing", None),
    ],
)
def test_extract_choice_numeric_labels(text, want):
    assert extract_choice(text, NUM) == want


def test_extract_choice_five_labels_and_defaults():
    assert extract_choice("E", ("A", "B", "C", "D", "E")) == 4
    assert extract_choice("answer: e") == 4
    assert extract_choice("5", ("1", "2", "3", "4", "5")) == 4


@pytest.mark.parametrize(
    "text, want",
    [
        ("#### 72", "72"),
        ("She sold 48 + 24 = 72 clips.\n#### 72", "72"),
        ("The answer is 1,234.", "1234"),
        ("It costs $1,234.50 in total.", "1234.5"),
        ("The answer is $5.", "5"),
        ("Total: -3 degrees", "-3"),
        ("Total: −3 degrees", "-3"),
        ("The temperature dropped to -12.5", "-12.5"),
        ("So he has 10 left. The answer is 10", "10"),
        ("3 + 4 = 7, then 7 * 2 = 14", "14"),
        ("The answer is 18. Check: 2 * 9 = 18, 20 - 2 = 18", "18"),
        ("answer: 42 apples (from 6 * 7)", "42"),
        ("\\boxed{1,000}", "1000"),
        ("so \\boxed{\\$25} is it, after 3 steps", "25"),
        ("#### 5.00", "5"),
        ("The result is 0.75", "0.75"),
        ("We get .5 of it", "0.5"),
        ("1,2,3", "3"),
        ("no numbers here", None),
        ("", None),
    ],
)
def test_extract_gsm8k(text, want):
    assert extract_gsm8k_answer(text) == want


def test_numbers():
    assert normalize_number("$1,000.50") == "1000.5"
    assert normalize_number("-3.0") == "-3"
    assert normalize_number("abc") is None
    assert numbers_equal("72.0", "72") and numbers_equal("1,000", "1000")
    assert not numbers_equal("71", "72") and not numbers_equal(None, "72")


@pytest.mark.parametrize(
    "text, want",
    [
        ("so $\\boxed{5}$", "5"),
        ("\\boxed{\\sqrt{2}}", "\\sqrt{2}"),
        ("\\boxed{\\frac{\\sqrt{3}}{2}} and finally \\boxed{\\frac{1}{\\sqrt{2}}}", "\\frac{1}{\\sqrt{2}}"),
        ("\\boxed{ \\{1, 2\\} }", "\\{1, 2\\}"),
        ("The final answer is $\\frac{1}{2}$.", "\\frac{1}{2}"),
        ("Answer: 12", "12"),
        ("no answer", None),
    ],
)
def test_extract_math(text, want):
    assert extract_math_answer(text) == want


@needs_math_verify
@pytest.mark.parametrize(
    "pred, gold",
    [
        ("0.5", "\\frac{1}{2}"),
        ("\\frac12", "\\dfrac{1}{2}"),
        ("\\frac{\\sqrt{2}}{2}", "\\frac{1}{\\sqrt{2}}"),
        ("2^{1/2}", "\\sqrt{2}"),
        ("(x+1)^2", "x^2+2x+1"),
        ("$3$", "3"),
        ("3.0", "3"),
        ("10\\%", "10\\%"),
        ("\\pi", "\\pi"),
    ],
)
def test_math_equal(pred, gold):
    assert math_equal(pred, gold)


@needs_math_verify
@pytest.mark.parametrize("pred, gold", [("0.4", "\\frac{1}{2}"), ("\\sqrt{3}", "\\sqrt{2}"), (None, "1"), ("", "1"), ("x", "")])
def test_math_not_equal(pred, gold):
    assert not math_equal(pred, gold)


@needs_math_verify
def test_math_equal_off_the_main_thread():
    # math-verify's SIGALRM timeout only works on the main thread
    out = []
    t = threading.Thread(target=lambda: out.append(math_equal("0.5", "\\frac{1}{2}")))
    t.start()
    t.join()
    assert out == [True]


@needs_math_verify
def test_is_correct_dispatch():
    arc = Example(id="a", task="arc_easy", question="q", answer="2", choices=("x", "y"), labels=("1", "2"), gold_index=1)
    gsm = Example(id="g", task="gsm8k", question="q", answer="1000")
    mth = Example(id="m", task="math", question="q", answer="\\frac{1}{2}")
    assert is_correct(arc, "The answer is 2") == 1 and is_correct(arc, "Answer: B") == 1
    assert is_correct(arc, "1") == 0 and is_correct(arc, "?") == 0
    assert extract_answer(arc, "(2)") == "2" and extract_answer(arc, "??") is None
    assert is_correct(gsm, "so 1,000 in all\n#### 1,000") == 1 and is_correct(gsm, "#### 999") == 0
    assert is_correct(mth, "thus $\\boxed{\\sqrt{2}}$ no wait $\\boxed{0.5}$") == 1
    assert is_correct(mth, "$\\boxed{\\frac{1}{3}}$") == 0 and is_correct(mth, "nothing") == 0
    assert generation_rewards([arc, gsm, mth], ["B", "#### 7", "\\boxed{1/2}"]) == [1, 0, 1]
    with pytest.raises(ValueError):
        generation_rewards([arc], [])


@pytest.mark.parametrize(
    "fn, text",
    [
        (extract_choice, "answer" + " " * 20000 + "xyz"),
        (extract_choice, "answer is" + " " * 5000 + ":" + " " * 5000 + "option" + " " * 5000 + "(" + " " * 5000 + "x"),
        (extract_choice, " " * 20000 + "(" + " " * 20000 + "q"),
        (extract_choice, "( " * 10000),
        (extract_gsm8k_answer, "1," * 10000 + "x"),
        (extract_math_answer, "\\boxed{" * 10000),
        (extract_math_answer, "answer is" + " " * 20000 + ":" + " " * 20000),
    ],
)
def test_extraction_is_linear_on_degenerate_text(fn, text):
    import time

    t = time.perf_counter()
    fn(text)
    assert time.perf_counter() - t < 2.0  # quadratic/cubic backtracking took > 10 s
