"""Rewards: log-likelihood (cloze) scoring and generation + extraction.

Log-likelihood follows lm-eval-harness: a request ``(context, continuation)``
is encoded as ``context_tokens + (tokens(context + continuation) beyond
len(context_tokens))``, trailing whitespace of the context moving to the
continuation; the model reads all tokens but the last (right padding) and the
continuation's log-probabilities are summed. ``acc_norm`` divides each
choice's sum by the choice's length in characters (lm-eval's
``completion_len``; ``normalize="bytes"`` uses UTF-8 bytes).

The forward pass is a plain ``model(input_ids=..., attention_mask=...)`` call
(plus ``routing_mask=`` marking the context's real tokens, so that routers pool
over the context only, and any ``**forward_kwargs``), so the same scoring runs
unchanged under a context manager such as ``drllm.forced_paths(model, paths)``.
A custom ``forward`` hook can replace the call entirely; it also receives the
ids of the rows in the batch (which example each row belongs to), for per-row
paths.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Literal, Sequence

import torch

from ..batching import pad_batch, prefix_mask
from .data import Example
from .extract import extract_answer, is_correct
from .prompts import Style, cloze_requests, encode_prompt, generation_prompt, use_chat_template

__all__ = [
    "ChoiceScore",
    "Generation",
    "encode_request",
    "loglikelihood",
    "score_choices",
    "choice_requests",
    "choice_scores_from_loglikelihoods",
    "generate_answers",
    "generation_rewards",
    "accuracy",
]

Normalize = Literal["chars", "bytes", "tokens", "none"]
ForwardHook = Callable[..., torch.Tensor]


# --------------------------------------------------------------------------
# encoding


def encode_request(
    tokenizer: Any, context: str, continuation: str, *, add_special_tokens: bool = False
) -> tuple[list[int], list[int]]:
    """(context tokens, continuation tokens) the lm-eval-harness way: trailing
    whitespace of the context moves to the continuation, the continuation's
    tokens are those of ``context + continuation`` beyond the context's token
    count. The context's tokens are :func:`~drllm.tasks.prompts.encode_prompt`'s
    (an empty context becomes the BOS, else EOS, token)."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    if not continuation:
        raise ValueError("empty continuation")
    ctx = encode_prompt(tokenizer, context, cloze=True, add_special_tokens=add_special_tokens)
    if not context:
        return ctx, encode_prompt(tokenizer, continuation)
    whole = encode_prompt(tokenizer, context + continuation, add_special_tokens=add_special_tokens)
    cont = whole[len(ctx) :]
    if not cont:
        raise ValueError(f"continuation {continuation!r} encodes to no tokens after context")
    return ctx, cont


# --------------------------------------------------------------------------
# forward


def _model_device(model: Any, device: Any) -> torch.device:
    if device is not None:
        return torch.device(device)
    dev = getattr(model, "device", None)
    if isinstance(dev, torch.device):
        return dev
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration, TypeError):
        return torch.device("cpu")


class _Forward:
    """Calls the model, passing ``routing_mask`` when asked; if the model
    rejects that keyword with a TypeError, warns once and stops passing it."""

    def __init__(self, model: Any, routing_mask: bool, forward: ForwardHook | None, kwargs: dict):
        self.model = model
        self.routing_mask = routing_mask
        self.hook = forward
        self.kwargs = kwargs

    def __call__(self, input_ids, attention_mask, routing_mask, rows) -> torch.Tensor:
        if self.hook is not None:
            out = self.hook(
                self.model,
                input_ids=input_ids,
                attention_mask=attention_mask,
                routing_mask=routing_mask if self.routing_mask else None,
                rows=rows,
                **self.kwargs,
            )
            return getattr(out, "logits", out)
        if self.routing_mask:
            try:
                out = self.model(
                    input_ids=input_ids, attention_mask=attention_mask, routing_mask=routing_mask, **self.kwargs
                )
                return out.logits
            except TypeError as err:
                if "routing_mask" not in str(err):
                    raise
                warnings.warn(
                    "the model does not accept routing_mask=; scoring without it "
                    "(pass routing_mask=False for a plain Hugging Face model)",
                    stacklevel=3,
                )
                self.routing_mask = False
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **self.kwargs).logits


def loglikelihood(
    model: Any,
    tokenizer: Any,
    requests: Sequence[tuple[str, str]],
    *,
    batch_size: int = 16,
    routing_mask: bool = True,
    forward: ForwardHook | None = None,
    row_ids: Sequence[int] | None = None,
    max_length: int | None = None,
    add_special_tokens: bool = False,
    device: Any = None,
    return_token_counts: bool = False,
    **forward_kwargs: Any,
) -> list[float] | tuple[list[float], list[int]]:
    """Summed log-probability of each continuation given its context.

    ``requests`` are ``(context, continuation)`` pairs. Rows are batched
    longest first (``batch_size`` rows a forward), right padded with the pad
    token; results come back in request order and do not depend on
    ``batch_size``. The model is called as
    ``model(input_ids=, attention_mask=, routing_mask=, **forward_kwargs)``
    with ``routing_mask`` [B, T] (1 on the context tokens of each row, 0 on its
    continuation and padding) only when ``routing_mask=True``. ``forward``,
    if given, replaces that call: ``forward(model, input_ids=, attention_mask=,
    routing_mask=, rows=, **forward_kwargs)`` returning logits (or an output
    with ``.logits``), where ``rows`` lists ``row_ids[r]`` (default: the
    request index) of each row. ``max_length`` left-truncates long inputs as
    lm-eval does. With ``return_token_counts`` also returns each
    continuation's token count.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    if row_ids is not None and len(row_ids) != len(requests):
        raise ValueError("row_ids must have one id per request")
    pad_id = getattr(tokenizer, "pad_token_id", None)
    if pad_id is None:
        pad_id = getattr(tokenizer, "eos_token_id", None)
    pad_id = 0 if pad_id is None else int(pad_id)

    items = []  # (request index, input tokens, n context tokens in input, continuation tokens)
    for i, (ctx_text, cont_text) in enumerate(requests):
        ctx, cont = encode_request(tokenizer, ctx_text, cont_text, add_special_tokens=add_special_tokens)
        inp = (ctx + cont)[:-1]
        if max_length is not None and len(inp) > max_length:
            inp = inp[-max_length:]
        n_ctx = len(inp) - (len(cont) - 1)
        if n_ctx < 1:
            raise ValueError(f"request {i}: continuation of {len(cont)} tokens does not fit in max_length={max_length}")
        items.append((i, inp, n_ctx, cont))

    order = sorted(range(len(items)), key=lambda k: -len(items[k][1]))  # stable: ties keep request order
    dev = _model_device(model, device)
    call = _Forward(model, routing_mask, forward, forward_kwargs)
    results = [0.0] * len(items)

    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            chunk = [items[k] for k in order[start : start + batch_size]]
            ids, attn = pad_batch([it[1] for it in chunk], pad_id)
            rmask = prefix_mask([it[2] for it in chunk], ids.shape[1])
            rows = [it[0] if row_ids is None else int(row_ids[it[0]]) for it in chunk]
            logits = call(ids.to(dev), attn.to(dev), rmask.to(dev), rows)
            if logits.shape[:2] != ids.shape:
                raise ValueError(f"logits of shape {tuple(logits.shape)} do not match inputs {tuple(ids.shape)}")
            for r, (i, inp, n_ctx, cont) in enumerate(chunk):
                # position p predicts token p + 1: continuation token j sits at
                # input position n_ctx + j, predicted from position n_ctx - 1 + j
                lp = logits[r, n_ctx - 1 : n_ctx - 1 + len(cont)].float().log_softmax(-1)
                target = torch.tensor(cont, dtype=torch.long, device=lp.device)
                results[i] = float(lp.gather(-1, target[:, None]).sum())
    if return_token_counts:
        return results, [len(it[3]) for it in items]
    return results


# --------------------------------------------------------------------------
# multiple choice (acc_norm)


@dataclass(frozen=True)
class ChoiceScore:
    """Cloze result of one example. ``choice`` is the acc_norm argmax,
    ``correct`` whether it is the gold one, ``margin`` the gold choice's
    normalised score minus the best wrong choice's (> 0 iff strictly correct;
    +inf with a single choice). ``logprobs`` are the raw sums,
    ``normalized`` the scores compared; ``choice_raw`` is the unnormalised
    (lm-eval ``acc``) argmax."""

    correct: int
    choice: int
    margin: float
    gold: int
    logprobs: tuple[float, ...]
    normalized: tuple[float, ...]
    choice_raw: int


def _argmax(xs: Sequence[float]) -> int:
    best = 0
    for i, x in enumerate(xs):
        if x > xs[best]:
            best = i
    return best


def choice_scores_from_loglikelihoods(
    logprobs: Sequence[float], gold: int, lengths: Sequence[float]
) -> ChoiceScore:
    """acc_norm choice from summed log-probs and normalising lengths."""
    normed = tuple(float(lp) / max(float(n), 1.0) for lp, n in zip(logprobs, lengths))
    choice = _argmax(normed)
    wrong = [s for j, s in enumerate(normed) if j != gold]
    margin = normed[gold] - max(wrong) if wrong else math.inf
    return ChoiceScore(
        correct=int(choice == gold),
        choice=choice,
        margin=margin,
        gold=gold,
        logprobs=tuple(float(x) for x in logprobs),
        normalized=normed,
        choice_raw=_argmax(list(logprobs)),
    )


def choice_requests(
    examples: Sequence[Example], tokenizer: Any = None, *, style: Style = "plain"
) -> tuple[list[tuple[str, str]], list[int], list[tuple[int, int]]]:
    """The flat cloze requests of multiple-choice ``examples``: ``(requests,
    owners, spans)`` where ``requests[k]`` is a ``(context, continuation)``
    pair, ``owners[k]`` its example's index and ``requests[a:b]`` with
    ``(a, b) = spans[i]`` are example ``i``'s choices in order."""
    requests: list[tuple[str, str]] = []
    owners: list[int] = []
    spans: list[tuple[int, int]] = []
    for e_idx, ex in enumerate(examples):
        if ex.gold_index is None or not ex.choices:
            raise ValueError(f"example {ex.id!r} ({ex.task}) is not multiple choice")
        ctx, conts = cloze_requests(ex, tokenizer, style=style)
        spans.append((len(requests), len(requests) + len(conts)))
        requests.extend((ctx, c) for c in conts)
        owners.extend([e_idx] * len(conts))
    return requests, owners, spans


def score_choices(
    model: Any,
    tokenizer: Any,
    examples: Sequence[Example],
    *,
    batch_size: int = 16,
    routing_mask: bool = True,
    normalize: Normalize = "chars",
    style: Style = "plain",
    forward: ForwardHook | None = None,
    rows: Literal["example", "request"] = "example",
    max_length: int | None = None,
    add_special_tokens: bool = False,
    device: Any = None,
    **forward_kwargs: Any,
) -> list[ChoiceScore]:
    """Score every choice of every (multiple-choice) example by log-likelihood
    and pick one acc_norm-style.

    Each example contributes one request per choice (context
    ``"Question: ...\\nAnswer:"``, continuation ``" <choice>"``), all batched
    together. ``normalize``: ``"chars"`` divides by the choice text's length
    in characters (lm-eval acc_norm), ``"bytes"`` by its UTF-8 length,
    ``"tokens"`` by its token count, ``"none"`` not at all (lm-eval acc).
    A ``forward`` hook gets ``rows=``: for each batch row the index in
    ``examples`` of its example (``rows="example"``, e.g. to pick per-example
    paths) or its index in :func:`choice_requests` (``rows="request"``).
    Other arguments as :func:`loglikelihood`.
    """
    if normalize not in ("chars", "bytes", "tokens", "none"):
        raise ValueError(f"normalize must be 'chars', 'bytes', 'tokens' or 'none', got {normalize!r}")
    if rows not in ("example", "request"):
        raise ValueError(f"rows must be 'example' or 'request', got {rows!r}")
    requests, owners, spans = choice_requests(examples, tokenizer, style=style)
    lls, ntok = loglikelihood(
        model,
        tokenizer,
        requests,
        batch_size=batch_size,
        routing_mask=routing_mask,
        forward=forward,
        row_ids=owners if rows == "example" else None,
        max_length=max_length,
        add_special_tokens=add_special_tokens,
        device=device,
        return_token_counts=True,
        **forward_kwargs,
    )
    out = []
    for ex, (a, b) in zip(examples, spans):
        if normalize == "chars":
            lengths = [float(len(c)) for c in ex.choices]
        elif normalize == "bytes":
            lengths = [float(len(c.encode("utf-8"))) for c in ex.choices]
        elif normalize == "tokens":
            lengths = [float(n) for n in ntok[a:b]]
        else:
            lengths = [1.0] * (b - a)
        out.append(choice_scores_from_loglikelihoods(lls[a:b], ex.gold_index, lengths))
    return out


def accuracy(results: Sequence[Any]) -> float:
    """Mean of ``.correct`` over results (0.0 when empty)."""
    return sum(r.correct for r in results) / len(results) if results else 0.0


# --------------------------------------------------------------------------
# generation mode


@dataclass(frozen=True)
class Generation:
    """One greedy generation: ``prompt``, generated ``text`` (special tokens
    removed, cut at the first stop string), the ``prediction`` extracted from
    it, ``correct`` (0/1), and token counts."""

    prompt: str
    text: str
    prediction: str | None
    correct: int
    prompt_tokens: int
    new_tokens: int


def _truncate(text: str, stop: Sequence[str]) -> str:
    cut = len(text)
    for s in stop:
        k = text.find(s)
        if k >= 0:
            cut = min(cut, k)
    return text[:cut]


def generation_rewards(examples: Sequence[Example], texts: Sequence[str]) -> list[int]:
    """Correctness (0/1) of generated ``texts`` for ``examples`` (extraction
    per task)."""
    if len(examples) != len(texts):
        raise ValueError("one text per example")
    return [is_correct(e, t) for e, t in zip(examples, texts)]


def generate_answers(
    model: Any,
    tokenizer: Any,
    examples: Sequence[Example],
    *,
    max_new_tokens: int = 256,
    batch_size: int = 8,
    style: Style = "auto",
    prompts: Sequence[str] | None = None,
    stop: Sequence[str] | None = None,
    device: Any = None,
    **generate_kwargs: Any,
) -> list[Generation]:
    """Greedy generation (left padding) then answer extraction.

    Prompts come from :func:`~drllm.tasks.prompts.generation_prompt` (chat
    template when the tokenizer has one and ``style="auto"``) unless given.
    ``stop`` strings cut the decoded text (default: ``"\\nQuestion:"`` for
    plain prompts, so a base model's next made-up question is not read as its
    answer). Chat prompts are tokenized without extra special tokens (the
    template has them). Extra keyword arguments go to ``model.generate``.
    """
    if not hasattr(model, "generate"):
        raise TypeError("generate_answers needs a model with a .generate method (a Hugging Face causal LM)")
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    chat = use_chat_template(tokenizer, style)
    if prompts is None:
        prompts = [generation_prompt(e, tokenizer, style=style) for e in examples]
    elif len(prompts) != len(examples):
        raise ValueError("one prompt per example")
    if stop is None:
        stop = () if chat else ("\nQuestion:",)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise ValueError("the tokenizer needs a pad or eos token for batched generation")
    eos_id = getattr(tokenizer, "eos_token_id", None)
    dev = _model_device(model, device)
    encoded = [encode_prompt(tokenizer, p, add_special_tokens=not chat) for p in prompts]

    gen_args = dict(do_sample=False, num_beams=1, max_new_tokens=max_new_tokens, pad_token_id=pad_id)
    if eos_id is not None:
        gen_args["eos_token_id"] = eos_id
    gen_args.update(generate_kwargs)

    out: list[Generation | None] = [None] * len(examples)
    order = sorted(range(len(examples)), key=lambda k: -len(encoded[k]))
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            ids, attn = pad_batch([encoded[k] for k in idx], pad_id, left=True)
            width = ids.shape[1]
            seqs = model.generate(input_ids=ids.to(dev), attention_mask=attn.to(dev), **gen_args)
            seqs = getattr(seqs, "sequences", seqs)
            for r, k in enumerate(idx):
                new = seqs[r, width:].tolist()
                n_new = len(new)
                if eos_id is not None and eos_id in new:
                    n_new = new.index(eos_id) + 1
                elif pad_id in new:  # finished rows are padded
                    n_new = new.index(pad_id)
                text = tokenizer.decode(new[:n_new], skip_special_tokens=True)
                text = _truncate(text, stop)
                ex = examples[k]
                out[k] = Generation(
                    prompt=prompts[k],
                    text=text,
                    prediction=extract_answer(ex, text),
                    correct=is_correct(ex, text),
                    prompt_tokens=len(encoded[k]),
                    new_tokens=n_new,
                )
    return out  # type: ignore[return-value]
