"""drllm.tasks rewards: log-likelihood scoring against a hand computation on a
tiny random Llama, batching invariance, routing_mask plumbing, generation."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from drllm.tasks import (
    Example,
    accuracy,
    choice_requests,
    choice_scores_from_loglikelihoods,
    cloze_requests,
    encode_request,
    generate_answers,
    generation_prompt,
    loglikelihood,
    score_choices,
)
from tiny_tokenizer import make_tiny_tokenizer


# Tiny models are all per-op overhead: one intra-op thread is faster (far faster on a busy machine).
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    m = LlamaForCausalLM(cfg).eval()
    # larger logits than the default init, so choices differ clearly
    with torch.no_grad():
        m.lm_head.weight.mul_(30)
    return m


def hand_loglik(model, tok, ctx: str, cont: str) -> float:
    """Direct computation: one unpadded forward over context + continuation."""
    c = tok(ctx, add_special_tokens=False)["input_ids"]
    w = tok(ctx + cont, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([w])
    with torch.no_grad():
        lp = model(input_ids=ids).logits[0].double().log_softmax(-1)
    return sum(float(lp[len(c) - 1 + j, w[len(c) + j]]) for j in range(len(w) - len(c)))


EXAMPLES = [
    Example(id="e0", task="arc_easy", question="Which gas do plants absorb?", answer="B",
            choices=("oxygen", "carbon dioxide", "helium", "neon"), labels=("A", "B", "C", "D"), gold_index=1),
    Example(id="e1", task="arc_easy", question="What is ice?", answer="3",
            choices=("steam", "gas", "frozen water"), labels=("1", "2", "3"), gold_index=2),
    Example(id="e2", task="arc_challenge", question="Why do leaves change colour in the autumn, mostly?", answer="A",
            choices=("less chlorophyll", "more rain", "wind", "the moon", "insects"),
            labels=("A", "B", "C", "D", "E"), gold_index=0),
]

REQUESTS = [
    ("Question: What is ice?\nAnswer:", " frozen water"),
    ("Q", " a"),
    ("Question: Which gas do plants absorb?\nAnswer:", " carbon dioxide"),
    ("Hello there,", " world"),
    ("Question: What is ice?\nAnswer:", " gas"),
]


def test_encode_request_like_lm_eval(tok):
    ctx, cont = encode_request(tok, "Answer: ", "B")  # trailing space moves to the continuation
    assert tok.decode(ctx) == "Answer:" and tok.decode(cont) == " B"
    ctx, cont = encode_request(tok, "", "hi")  # empty context -> BOS stands in
    assert ctx == [tok.bos_token_id] and tok.decode(cont) == "hi"
    with pytest.raises(ValueError):
        encode_request(tok, "x", "")


@pytest.mark.parametrize("batch_size", [1, 2, 3, 16])
def test_loglikelihood_matches_hand_computation(model, tok, batch_size):
    got = loglikelihood(model, tok, REQUESTS, batch_size=batch_size, routing_mask=False)
    want = [hand_loglik(model, tok, c, x) for c, x in REQUESTS]
    assert got == pytest.approx(want, rel=1e-5, abs=1e-4)
    assert all(v < 0 for v in got)


def test_loglikelihood_token_counts_and_empty_context(model, tok):
    lls, n = loglikelihood(model, tok, [("ab", "cde"), ("", "xy")], return_token_counts=True, routing_mask=False)
    assert n == [3, 2]
    bos = tok.bos_token_id
    with torch.no_grad():
        lp = model(input_ids=torch.tensor([[bos] + tok("xy")["input_ids"]])).logits[0].log_softmax(-1)
    x, y = tok("xy")["input_ids"]
    assert lls[1] == pytest.approx(float(lp[0, x] + lp[1, y]), abs=1e-4)


def test_loglikelihood_max_length_truncates_left(model, tok):
    ctx, cont = "abcdefghij", "klm"
    (got,) = loglikelihood(model, tok, [(ctx, cont)], max_length=6, routing_mask=False)
    # lm-eval: input = (ctx + cont)[-(max_length + 1):][:-1]
    assert got == pytest.approx(hand_loglik(model, tok, ctx[-4:], cont), abs=1e-4)
    with pytest.raises(ValueError):
        loglikelihood(model, tok, [(ctx, cont)], max_length=2, routing_mask=False)


def test_score_choices_against_hand_acc_norm(model, tok):
    res = score_choices(model, tok, EXAMPLES, batch_size=4, routing_mask=False)
    assert len(res) == len(EXAMPLES)
    for ex, r in zip(EXAMPLES, res):
        ctx, conts = cloze_requests(ex)
        lls = [hand_loglik(model, tok, ctx, c) for c in conts]
        normed = [lp / len(c) for lp, c in zip(lls, ex.choices)]  # lm-eval: len(choice), no leading space
        assert r.logprobs == pytest.approx(lls, abs=1e-4)
        assert r.normalized == pytest.approx(normed, abs=1e-4)
        best = max(range(len(normed)), key=lambda j: normed[j])
        assert r.choice == best and r.correct == int(best == ex.gold_index) and r.gold == ex.gold_index
        wrong = max(s for j, s in enumerate(normed) if j != ex.gold_index)
        assert r.margin == pytest.approx(normed[ex.gold_index] - wrong, abs=1e-4)
        assert (r.margin > 0) == bool(r.correct)
        assert r.choice_raw == max(range(len(lls)), key=lambda j: lls[j])
    assert accuracy(res) == sum(r.correct for r in res) / 3


def test_score_choices_batch_invariance(model, tok):
    a = score_choices(model, tok, EXAMPLES, batch_size=1, routing_mask=False)
    b = score_choices(model, tok, EXAMPLES, batch_size=3, routing_mask=False)
    c = score_choices(model, tok, EXAMPLES[::-1], batch_size=7, routing_mask=False)[::-1]
    for x, y, z in zip(a, b, c):
        assert x.choice == y.choice == z.choice and x.correct == y.correct == z.correct
        assert x.logprobs == pytest.approx(y.logprobs, abs=1e-4)
        assert x.logprobs == pytest.approx(z.logprobs, abs=1e-4)
        assert x.margin == pytest.approx(y.margin, abs=1e-4)


def test_normalize_modes(model, tok):
    ex = [Example(id="u", task="arc_easy", question="q", answer="A", choices=("é", "ab"), labels=("A", "B"), gold_index=0)]
    chars = score_choices(model, tok, ex, routing_mask=False)[0]
    nbytes = score_choices(model, tok, ex, routing_mask=False, normalize="bytes")[0]
    toks = score_choices(model, tok, ex, routing_mask=False, normalize="tokens")[0]
    none = score_choices(model, tok, ex, routing_mask=False, normalize="none")[0]
    lp = chars.logprobs
    assert chars.normalized == pytest.approx((lp[0] / 1, lp[1] / 2))
    assert nbytes.normalized == pytest.approx((lp[0] / 2, lp[1] / 2))  # "é" is 2 bytes
    assert toks.normalized == pytest.approx((lp[0] / 2, lp[1] / 3))  # " é" -> 2 tokens, " ab" -> 3
    assert none.normalized == pytest.approx(lp)
    with pytest.raises(ValueError):
        score_choices(model, tok, ex, normalize="words")
    with pytest.raises(ValueError):
        score_choices(model, tok, [Example(id="g", task="gsm8k", question="q", answer="1")])


def test_choice_scores_edge_cases():
    s = choice_scores_from_loglikelihoods([-2.0, -2.0], gold=1, lengths=[1, 1])
    assert s.choice == 0 and s.correct == 0 and s.margin == 0.0  # ties go to the first choice
    s = choice_scores_from_loglikelihoods([-3.0], gold=0, lengths=[3])
    assert s.correct == 1 and s.margin == math.inf


def flat(results):
    return [x for r in results for x in r.logprobs]


class Recorder(torch.nn.Module):
    """A model wrapper that records the keyword arguments of each call."""

    def __init__(self, inner, accept_routing_mask=True):
        super().__init__()
        self.inner = inner
        self.calls = []
        self.accept = accept_routing_mask

    def forward(self, input_ids, attention_mask, **kwargs):
        if "routing_mask" in kwargs and not self.accept:
            raise TypeError("forward() got an unexpected keyword argument 'routing_mask'")
        self.calls.append(dict(input_ids=input_ids, attention_mask=attention_mask, **kwargs))
        kwargs.pop("routing_mask", None)
        kwargs.pop("tag", None)
        return self.inner(input_ids=input_ids, attention_mask=attention_mask, **kwargs)


def test_routing_mask_marks_context_tokens(model, tok):
    rec = Recorder(model)
    reqs = [("abc", "de"), ("Question: x\nAnswer:", " long answer"), ("q", " z")]
    plain = loglikelihood(model, tok, reqs, batch_size=3, routing_mask=False)
    got = loglikelihood(rec, tok, reqs, batch_size=3, tag="t")  # routing_mask defaults to True
    assert got == pytest.approx(plain, abs=1e-5)
    (call,) = rec.calls
    assert call["tag"] == "t"  # forward kwargs are passed through
    rm, am, ids = call["routing_mask"], call["attention_mask"], call["input_ids"]
    assert rm.shape == am.shape == ids.shape and ids.shape[0] == 3
    # rows are sorted longest first; each row's routing mask covers its context only
    by_len = sorted(reqs, key=lambda r: -(len(r[0]) + len(r[1]) - 1))
    for row, (ctx, cont) in enumerate(by_len):
        n_in = len(ctx) + len(cont) - 1
        assert rm[row].tolist() == [1] * len(ctx) + [0] * (ids.shape[1] - len(ctx))
        assert am[row].tolist() == [1] * n_in + [0] * (ids.shape[1] - n_in)  # right padding
        assert ids[row, n_in:].eq(tok.pad_token_id).all()

    rec.calls.clear()
    loglikelihood(rec, tok, reqs, routing_mask=False)
    assert "routing_mask" not in rec.calls[0]


def test_model_rejecting_routing_mask_falls_back(model, tok):
    rec = Recorder(model, accept_routing_mask=False)
    with pytest.warns(UserWarning, match="routing_mask"):
        got = score_choices(rec, tok, EXAMPLES, batch_size=5)
    want = score_choices(model, tok, EXAMPLES, batch_size=5, routing_mask=False)
    assert flat(got) == pytest.approx(flat(want), abs=1e-4)


def test_forward_hook_gets_example_rows(model, tok):
    seen = []

    def hook(m, *, input_ids, attention_mask, routing_mask, rows):
        seen.append((list(rows), routing_mask.sum(1).tolist()))
        return m(input_ids=input_ids, attention_mask=attention_mask)

    got = score_choices(model, tok, EXAMPLES, batch_size=4, forward=hook)
    want = score_choices(model, tok, EXAMPLES, batch_size=4, routing_mask=False)
    assert flat(got) == pytest.approx(flat(want), abs=1e-4)
    rows = [r for batch, _ in seen for r in batch]
    assert sorted(rows) == sorted([0] * 4 + [1] * 3 + [2] * 5)
    ctx_len = {i: len(cloze_requests(e)[0]) for i, e in enumerate(EXAMPLES)}
    for batch, lengths in seen:
        assert lengths == [ctx_len[i] for i in batch]


# ---------------------------------------------------------------- generation


class ScriptedLM:
    """Stands in for a causal LM: ``generate`` appends a scripted reply (then
    EOS, then padding) to each row, and checks the rows are left padded."""

    def __init__(self, tok, replies):
        self.tok, self.replies, self.calls = tok, replies, []

    def parameters(self):
        return iter([torch.zeros(1)])

    def generate(self, input_ids, attention_mask, max_new_tokens, pad_token_id, eos_token_id, do_sample, **kw):
        assert do_sample is False
        self.calls.append((input_ids.clone(), attention_mask.clone()))
        assert attention_mask[:, -1].all()  # left padding: every row ends at the last column
        outs = []
        for row in range(input_ids.shape[0]):
            n = int(attention_mask[row].sum())
            prompt = self.tok.decode(input_ids[row, -n:].tolist())
            reply = self.tok(self.replies[prompt], add_special_tokens=False)["input_ids"][:max_new_tokens]
            outs.append(reply + [eos_token_id])
        width = max(map(len, outs))
        new = torch.tensor([o + [pad_token_id] * (width - len(o)) for o in outs])
        return torch.cat([input_ids, new], 1)


def test_generate_answers_pipeline(tok):
    exs = [
        EXAMPLES[0],
        Example(id="g", task="gsm8k", question="What is 10 * 100?", answer="1000"),
        Example(id="m", task="math", question="Half?", answer="\\frac{1}{2}"),
    ]
    prompts = [generation_prompt(e, tok) for e in exs]
    replies = {prompts[0]: "The answer is (B).", prompts[1]: "10 * 100 = 1,000\n#### 1,000", prompts[2]: "$\\boxed{0.5}$"}
    lm = ScriptedLM(tok, replies)
    out = generate_answers(lm, tok, exs, max_new_tokens=64, batch_size=2)
    assert [g.correct for g in out] == [1, 1, 1]
    assert [g.prediction for g in out] == ["B", "1000", "0.5"]
    assert out[0].text == "The answer is (B)." and out[0].new_tokens == len("The answer is (B).") + 1
    assert out[1].prompt == prompts[1] and out[1].prompt_tokens == len(tok(prompts[1])["input_ids"])
    assert len(lm.calls) == 2 and lm.calls[0][0].shape[0] == 2

    wrong = ScriptedLM(tok, {p: "I think A" for p in prompts})
    assert [g.correct for g in generate_answers(wrong, tok, exs, max_new_tokens=64)] == [0, 0, 0]


def test_generate_answers_base_prompt_stops_at_next_question(tok):
    base = make_tiny_tokenizer(chat_template=False)
    ex = EXAMPLES[0]
    p = generation_prompt(ex, base)
    lm = ScriptedLM(base, {p: " B\nQuestion: next one?\nAnswer: C"})
    (g,) = generate_answers(lm, base, [ex], max_new_tokens=64)
    assert g.text == " B" and g.correct == 1


def test_generate_answers_real_model_left_padding(model, tok):
    exs = EXAMPLES + [Example(id="g", task="gsm8k", question="1+1?", answer="2")]
    one = generate_answers(model, tok, exs, max_new_tokens=6, batch_size=1)
    many = generate_answers(model, tok, exs, max_new_tokens=6, batch_size=4)
    assert [g.text for g in one] == [g.text for g in many]
    assert all(0 < g.new_tokens <= 6 for g in one)
    # greedy: the first new token is the argmax after the unpadded prompt
    ids = tok(one[1].prompt, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        first = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
    full = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=1, do_sample=False, pad_token_id=0)
    assert int(full[0, -1]) == first


def test_forward_hook_request_rows(model, tok):
    reqs, owners, spans = choice_requests(EXAMPLES)
    assert len(reqs) == 12 and owners == [0] * 4 + [1] * 3 + [2] * 5 and spans == [(0, 4), (4, 7), (7, 12)]
    assert reqs[5] == cloze_requests(EXAMPLES[1])[0:1] + (" gas",)
    seen = []

    def hook(m, *, input_ids, attention_mask, routing_mask, rows):
        for r, k in enumerate(rows):  # row r holds request k
            n = int(attention_mask[r].sum())
            seen.append((k, tok.decode(input_ids[r, :n].tolist())))
        return m(input_ids=input_ids, attention_mask=attention_mask)

    score_choices(model, tok, EXAMPLES, batch_size=5, forward=hook, rows="request")
    assert sorted(k for k, _ in seen) == list(range(12))
    for k, text in seen:
        assert text == (reqs[k][0] + reqs[k][1])[:-1]
    with pytest.raises(ValueError):
        score_choices(model, tok, EXAMPLES, rows="batch")
