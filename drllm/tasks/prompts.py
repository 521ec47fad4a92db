"""Prompts for instruct models (the tokenizer's chat template) and base models
(plain text).

* :func:`generation_prompt` - the prompt a model completes in generation mode
  (ARC as a letter-choice question, GSM8K / MATH as a worked problem).
* :func:`cloze_requests` - ARC in log-likelihood mode, as lm-eval-harness
  scores it: context ``"Question: <stem>\\nAnswer:"``, one continuation
  ``" <choice text>"`` per choice.
* :func:`encode_prompt` - the one encoder of prompts into token ids: scoring,
  generation, the search records and router training all call it, so the
  tokens routers are trained on are those they pool over at inference.
"""

from __future__ import annotations

from typing import Any, Literal, Sequence

from .data import Example

__all__ = [
    "use_chat_template",
    "display_labels",
    "question_text",
    "generation_prompt",
    "cloze_context",
    "cloze_requests",
    "encode_prompt",
]

Style = Literal["auto", "chat", "plain"]

ARC_INSTRUCTION = "Answer with the letter of the correct choice."
GSM8K_INSTRUCTION = "Solve the problem step by step. End with the final answer as a number after '####'."
MATH_INSTRUCTION = "Solve the problem step by step. Put the final answer within \\boxed{}."


def use_chat_template(tokenizer: Any, style: Style = "auto") -> bool:
    """``style="auto"``: chat when the tokenizer has a chat template."""
    if style == "chat":
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ValueError("style='chat' needs a tokenizer with a chat_template")
        return True
    if style == "plain":
        return False
    if style != "auto":
        raise ValueError(f"style must be 'auto', 'chat' or 'plain', got {style!r}")
    return tokenizer is not None and bool(getattr(tokenizer, "chat_template", None))


def display_labels(example: Example, letters: bool = True) -> tuple[str, ...]:
    """Labels shown in a letter-choice prompt: A, B, C... (``letters=True``,
    also for items whose labels are 1-5), else the item's own labels."""
    if letters:
        return tuple("ABCDEFGHIJ"[i] for i in range(len(example.choices)))
    return example.labels


def question_text(example: Example, letters: bool = True) -> str:
    """The question with its lettered options (ARC), or the problem."""
    if not example.choices:
        return example.question
    labs = display_labels(example, letters)
    opts = "\n".join(f"{lab}. {text}" for lab, text in zip(labs, example.choices))
    return f"{example.question}\n{opts}"


def _chat(tokenizer: Any, user: str, system: str | None = None) -> str:
    messages = []
    if system:
        messages.append({"role": "system", "content": system})
    messages.append({"role": "user", "content": user})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def generation_prompt(
    example: Example,
    tokenizer: Any = None,
    *,
    style: Style = "auto",
    system: str | None = None,
    letters: bool = True,
) -> str:
    """The text a model completes to answer ``example`` (greedy generation).

    Chat style (instruct models): one user turn with the question and an
    instruction, then the template's generation prompt. Plain style (base
    models): ``Question: ...\\n<options>\\nAnswer:`` for ARC; for GSM8K / MATH
    ``Question: ...\\nAnswer:`` after the instruction.
    """
    chat = use_chat_template(tokenizer, style)
    body = question_text(example, letters)
    if example.choices:
        instruction = ARC_INSTRUCTION
    elif example.task == "gsm8k":
        instruction = GSM8K_INSTRUCTION
    else:
        instruction = MATH_INSTRUCTION
    if chat:
        return _chat(tokenizer, f"{body}\n\n{instruction}", system)
    if example.choices:
        return f"Question: {body}\n{instruction}\nAnswer:"
    return f"{instruction}\n\nQuestion: {body}\nAnswer:"


def cloze_context(example: Example, tokenizer: Any = None, *, style: Style = "plain") -> str:
    """Context of the cloze (log-likelihood) formulation. Plain by default,
    exactly lm-eval-harness's ARC ``"Question: <stem>\\nAnswer:"``; with
    ``style="chat"`` (or ``"auto"`` and a chat tokenizer) that text is the user
    turn and the context ends with the assistant prompt."""
    text = f"Question: {example.question}\nAnswer:"
    if use_chat_template(tokenizer, style):
        return _chat(tokenizer, text)
    return text


def cloze_requests(
    example: Example, tokenizer: Any = None, *, style: Style = "plain"
) -> tuple[str, list[str]]:
    """``(context, continuations)`` of an ARC item: continuation i is
    ``" " + choice_i`` (no leading space after a chat prompt)."""
    if not example.choices:
        raise ValueError(f"cloze scoring needs a multiple-choice example, got task {example.task!r}")
    ctx = cloze_context(example, tokenizer, style=style)
    sep = "" if use_chat_template(tokenizer, style) else " "
    return ctx, [sep + c for c in example.choices]


def batch_generation_prompts(
    examples: Sequence[Example], tokenizer: Any = None, **kwargs: Any
) -> list[str]:
    return [generation_prompt(e, tokenizer, **kwargs) for e in examples]


def encode_prompt(tokenizer: Any, text: str, *, cloze: bool = False, add_special_tokens: bool = False) -> list[int]:
    """Token ids of a prompt as scoring reads it (and routers pool over it).

    ``cloze``: a log-likelihood context. Its trailing whitespace belongs to the
    continuation (lm-eval-harness), and an empty context stands as the BOS
    token (else EOS, else pad) so that the first continuation token has
    something to be predicted from. ``add_special_tokens``: the tokenizer's
    own (generation adds them, unless a chat template already wrote them).
    """
    if cloze:
        text = text.rstrip()
        if not text:
            return [_prefix_token(tokenizer)]
    return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


def _prefix_token(tokenizer: Any) -> int:
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        tid = getattr(tokenizer, name, None)
        if tid is not None:
            return int(tid)
    raise ValueError("empty context and the tokenizer has no bos/eos/pad token to stand in for it")
