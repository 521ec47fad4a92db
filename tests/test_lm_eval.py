"""lm-eval-harness model ``drllm``: simple_evaluate on tiny local tasks, no hub."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import tiny_model
from tiny_tokenizer import make_tiny_tokenizer

import drllm
from drllm.tasks import loglikelihood

# Tiny models are all per-op overhead: one intra-op thread is faster (far faster on a busy machine).
pytestmark = pytest.mark.usefixtures("one_thread")

lm_eval = pytest.importorskip("lm_eval")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

L = 4
DOCS = [
    {"question": f"What is {i} and {i * 3 % 7}?{' more' * (i % 3)}",
     "choices": [f"red {i}", f"green{'!' * i}", "blue sky", f"{i} apples"][: 3 + i % 2],
     "gold": i % 3, "answer": "x" * (i % 2)}
    for i in range(7)
]


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tasks")
    data = d / "docs.jsonl"
    data.write_text("".join(json.dumps(x) + "\n" for x in DOCS))
    common = f"""dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
"""
    (d / "tiny_mc.yaml").write_text("task: drllm_tiny_mc\n" + common + """output_type: multiple_choice
doc_to_choice: "{{choices}}"
doc_to_target: gold
metric_list:
  - metric: acc
  - metric: acc_norm
""")
    (d / "tiny_gen.yaml").write_text("task: drllm_tiny_gen\n" + common + """output_type: generate_until
doc_to_target: answer
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 3
  do_sample: false
metric_list:
  - metric: exact_match
""")
    return d


def decisive_routers(model, tok, scale=30.0):
    with torch.random.fork_rng():
        torch.manual_seed(1)
        routers = drllm.Routers.for_model(model, num_windows=4)
    texts = [f"Question: {d['question']}\nAnswer:" for d in DOCS]
    batch = tok(texts, return_tensors="pt", padding=True)
    states = drllm.block_states(model, **batch)
    with torch.no_grad():
        for i, mlp in enumerate(routers.mlps):
            mlp.fc2.weight.mul_(scale)
            mlp.fc2.bias.sub_(routers.logits(i, states[i], batch["attention_mask"]).mean(0))
    return routers


@pytest.fixture(scope="module")
def routers_dir(tmp_path_factory, one_thread):
    d = tmp_path_factory.mktemp("routers")
    decisive_routers(tiny_model("llama", seed=7, num_layers=L), make_tiny_tokenizer()).save_pretrained(d)
    return d


def run(task_dir, routers_dir, task, batch_size):
    import drllm.integrations.lm_eval  # noqa: F401  registers "drllm"
    from lm_eval.tasks import TaskManager

    model = tiny_model("llama", seed=7, num_layers=L)
    tok = make_tiny_tokenizer()
    out = lm_eval.simple_evaluate(
        model="drllm",
        model_args={"pretrained": model, "tokenizer": tok, "routers": str(routers_dir), "lam": 0.0},
        tasks=[task], batch_size=batch_size, device="cpu", log_samples=True,
        task_manager=TaskManager(include_path=str(task_dir), include_defaults=False),
        bootstrap_iters=0,
    )
    return out, model, tok


def test_loglikelihood_routes_on_context_only_and_ignores_batch_size(task_dir, routers_dir):
    out4, model, tok = run(task_dir, routers_dir, "drllm_tiny_mc", 4)
    out1, _, _ = run(task_dir, routers_dir, "drllm_tiny_mc", 1)
    s4 = sorted(out4["samples"]["drllm_tiny_mc"], key=lambda s: s["doc_id"])
    s1 = sorted(out1["samples"]["drllm_tiny_mc"], key=lambda s: s["doc_id"])
    requests = [tuple(a) for s in s4 for a in s["arguments"]]
    lm4 = [float(r[0][0]) for s in s4 for r in s["resps"]]
    lm1 = [float(r[0][0]) for s in s1 for r in s["resps"]]
    assert len(requests) == sum(len(d["choices"]) for d in DOCS)
    assert lm4 == pytest.approx(lm1, abs=1e-4)
    # reference: drllm's own scoring on the patched model, routers pooling over the context only
    assert drllm.is_patched(model)
    ref = loglikelihood(model, tok, [(c, x) for c, x in requests], batch_size=1, routing_mask=True)
    assert lm4 == pytest.approx(ref, abs=1e-4)
    # and it differs from pooling over context + continuation, which HFLM's own path would do
    pooled_all = loglikelihood(model, tok, [(c, x) for c, x in requests], batch_size=1, routing_mask=False)
    assert any(abs(a - b) > 1e-3 for a, b in zip(ref, pooled_all))
    acc = out4["results"]["drllm_tiny_mc"]["acc,none"]
    assert acc == pytest.approx(out1["results"]["drllm_tiny_mc"]["acc,none"])


def test_generation_batched_equals_one_at_a_time(task_dir, routers_dir):
    out3, model, tok = run(task_dir, routers_dir, "drllm_tiny_gen", 3)
    out1, _, _ = run(task_dir, routers_dir, "drllm_tiny_gen", 1)
    g3 = [s["resps"][0][0] for s in sorted(out3["samples"]["drllm_tiny_gen"], key=lambda s: s["doc_id"])]
    g1 = [s["resps"][0][0] for s in sorted(out1["samples"]["drllm_tiny_gen"], key=lambda s: s["doc_id"])]
    assert g3 == g1
    # reference: the routed model generating each prompt alone
    ref = []
    for d in DOCS:
        ids = torch.tensor([tok(f"Question: {d['question']}\nAnswer:")["input_ids"]])
        seq = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=3,
                             do_sample=False, pad_token_id=tok.pad_token_id)
        ref.append(tok.decode(seq[0, ids.shape[1]:], skip_special_tokens=True).split("\n")[0])
    assert g3 == ref


def test_drllm_lm_eval_runs_lm_evals_command_line(task_dir, routers_dir, tmp_path, capsys):
    """``drllm lm-eval ARGS...`` is lm-eval's own command line with ``--model drllm`` found: the same results as
    simple_evaluate on the same model, routers and task."""
    from drllm.cli import main

    model_dir, out_dir = tmp_path / "model", tmp_path / "out"
    tiny_model("llama", seed=7, num_layers=L).save_pretrained(model_dir)
    make_tiny_tokenizer().save_pretrained(model_dir)
    code = main(["lm-eval", "--model", "drllm", "--model_args", f"pretrained={model_dir},routers={routers_dir}",
                 "--tasks", "drllm_tiny_mc", "--include_path", str(task_dir), "--device", "cpu", "--batch_size", "2",
                 "--output_path", str(out_dir)])
    assert code == 0
    assert "drllm_tiny_mc" in capsys.readouterr().out, "lm-eval printed its results table"
    [written] = list(out_dir.rglob("results_*.json"))
    got = json.loads(written.read_text())["results"]["drllm_tiny_mc"]
    want = run(task_dir, routers_dir, "drllm_tiny_mc", 2)[0]["results"]["drllm_tiny_mc"]
    assert got["acc,none"] == pytest.approx(want["acc,none"]) and got["acc_norm,none"] == pytest.approx(
        want["acc_norm,none"])
    assert main(["lm-eval", "--model", "drllm", "--tasks"]) == 2, "lm-eval's own usage errors come back"
