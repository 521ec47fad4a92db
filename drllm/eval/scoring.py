"""Scoring runs: the frozen model with and without routers (or forced onto a path), on the same items.

For each example the vanilla model (every block once) and the routed model
(the routers' path, decided once on the prompt) are scored the same way:

- ``reward="loglik"``: every choice of a multiple-choice item is scored by
  log-likelihood (:func:`drllm.tasks.score_choices`, acc_norm), one forward
  pass per choice; the routers pool over the context only (``routing_mask``),
  so every choice of an item runs on the same path.
- ``reward="generate"``: greedy generation and answer extraction
  (:func:`drllm.tasks.generate_answers`).

The path each routed example took is read from the output of its own call
(``out.paths`` of the forward pass, ``.paths`` of ``generate``).

**Layers per example** counts block applications over every forward pass of
the example: ``path length x forward passes``. Log-likelihood: one pass per
choice. Generation: the prefill, which yields the first new token, plus one
decode step for every later new token (the last token is never fed back), so
``max(new_tokens, 1)`` passes. The vanilla path length is the number of blocks.

Accuracy comes with a 95% Wilson score interval (:mod:`drllm.eval.stats`).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from ..paths import path_to_str
from ..routing.routers import Routers
from ..runtime.adapters import describe
from ..runtime.control import forced_paths
from ..runtime.patch import is_patched, patch, unpatch
from ..search.evaluator import PathEvaluator
from ..tasks import Example, encode_prompt, generate_answers, generation_prompt, score_choices, use_chat_template
from .stats import wilson_interval

__all__ = ["evaluate", "lam_sweep", "budget_sweep", "evaluate_path", "score_paths", "path_row", "summarize_rows", "vanilla_baseline", "REWARDS"]

REWARDS = ("loglik", "generate")


def _loglik_rows(model, tokenizer, examples, *, routed: bool, batch_size: int, style: str, normalize: str,
                 path: str | None = None) -> list[dict]:
    fixed = path or "1" * describe(model).num_blocks
    paths: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(examples))}

    def forward(m, *, input_ids, attention_mask, routing_mask, rows, **kw):
        out = m(input_ids=input_ids, attention_mask=attention_mask, routing_mask=routing_mask, **kw)
        decided = out.paths
        for r, owner in enumerate(rows):
            paths[int(owner)].append(decided[r])
        return out.logits

    scores = score_choices(
        model, tokenizer, examples, batch_size=batch_size, routing_mask=routed, normalize=normalize, style=style,
        forward=forward if routed else None, rows="example",
    )
    out = []
    for i, (ex, s) in enumerate(zip(examples, scores)):
        row = {"correct": int(s.correct), "choice": int(s.choice), "margin": float(s.margin), "passes": len(ex.choices)}
        if routed:
            taken = torch.stack(paths[i])  # one path per choice's forward pass
            row["path"] = path_to_str(taken[0])
            row["consistent"] = bool((taken == taken[0]).all())
            row["layers"] = int(taken.sum())
        else:
            row["path"] = fixed
            row["layers"] = _length(fixed) * len(ex.choices)
        out.append(row)
    return out


class _Recorder:
    """Stands in for the model in :func:`generate_answers`: records each batch's rows and the paths its call
    returned."""

    def __init__(self, model):
        self._model = model
        self.seen: dict[tuple[int, ...], torch.Tensor] = {}

    def __getattr__(self, name):
        return getattr(self._model, name)

    def generate(self, input_ids=None, attention_mask=None, **kw):
        out = self._model.generate(input_ids=input_ids, attention_mask=attention_mask, return_dict_in_generate=True,
                                   **kw)
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        for r in range(input_ids.shape[0]):
            self.seen[tuple(input_ids[r][mask[r].bool()].tolist())] = out.paths[r]
        return out.sequences


def _generate_rows(model, tokenizer, examples, *, routed: bool, batch_size: int, style: str, max_new_tokens: int,
                   path: str | None = None):
    fixed = path or "1" * describe(model).num_blocks
    target = _Recorder(model) if routed else model
    gens = generate_answers(target, tokenizer, examples, max_new_tokens=max_new_tokens, batch_size=batch_size,
                            style=style)
    chat = use_chat_template(tokenizer, style)
    out = []
    for ex, g in zip(examples, gens):
        passes = max(int(g.new_tokens), 1)
        row = {"correct": int(g.correct), "prediction": g.prediction, "new_tokens": int(g.new_tokens), "passes": passes}
        if routed:
            prompt = generation_prompt(ex, tokenizer, style=style)
            key = tuple(encode_prompt(tokenizer, prompt, add_special_tokens=not chat))
            if key not in target.seen:
                raise RuntimeError(f"no recorded path for example {ex.id!r}: prompt encoding differs from generate_answers")
            path = target.seen[key]
            row["path"] = path_to_str(path)
            row["layers"] = int(path.sum()) * passes
        else:
            row["path"] = fixed
            row["layers"] = _length(fixed) * passes
        out.append(row)
    return out


def _length(path: str) -> int:
    return sum(int(c) for c in path)


def _run(model, tokenizer, examples, reward, routed, batch_size, style, normalize, max_new_tokens, path=None):
    if reward == "loglik":
        return _loglik_rows(model, tokenizer, examples, routed=routed, batch_size=batch_size,
                            style=style or "plain", normalize=normalize, path=path)
    return _generate_rows(model, tokenizer, examples, routed=routed, batch_size=batch_size,
                          style=style or "auto", max_new_tokens=max_new_tokens, path=path)


def summarize_rows(rows: list[dict], num_blocks: int) -> dict:
    """Accuracy, Wilson interval, path length, layers and passes per example, and decision counts of ``rows``."""
    n = len(rows)
    k = sum(r["correct"] for r in rows)
    lo, hi = wilson_interval(k, n)
    lengths = [_length(r["path"]) for r in rows]
    out = {
        "n": n,
        "correct": k,
        "accuracy": k / n if n else 0.0,
        "ci95": [lo, hi],
        "mean_path_length": sum(lengths) / n if n else 0.0,
        "layers_per_example": sum(r["layers"] for r in rows) / n if n else 0.0,
        "forward_passes_per_example": sum(r["passes"] for r in rows) / n if n else 0.0,
    }
    counts = torch.zeros(num_blocks, 3, dtype=torch.long)
    for r in rows:
        for i, c in enumerate(r["path"]):
            counts[i, int(c)] += 1
    out["decision_counts"] = dict(zip(("skip", "execute", "repeat"), counts.sum(0).tolist()))
    out["per_layer_decisions"] = counts.tolist()
    return out


def evaluate(
    model: torch.nn.Module,
    tokenizer: Any,
    routers: Routers,
    examples: Sequence[Example],
    *,
    reward: str = "loglik",
    lam: float = 0.0,
    budget: int | None = None,
    batch_size: int = 16,
    max_new_tokens: int = 256,
    style: str | None = None,
    normalize: str = "chars",
    baseline: dict | None = None,
) -> dict:
    """Vanilla and routed accuracy and layer counts of ``model`` on ``examples``.

    ``model`` must not be patched: it is patched with ``routers`` (and the
    control knob ``lam``, or the ``budget`` of budget routers) for the routed
    run and unpatched afterwards.
    ``style`` is the prompt style (default ``"plain"`` cloze for
    ``loglik``, ``"auto"`` for ``generate``). ``baseline``, an earlier
    result of this function on the same examples and settings, supplies the
    vanilla run (a lambda sweep scores the vanilla model once).

    Returns ``{"reward", "lam", "budget", "num_blocks", "n", "vanilla", "routed",
    "difference", "examples", "decisions"}``: ``vanilla`` / ``routed`` hold
    ``accuracy``, ``ci95`` (Wilson), ``correct``, ``mean_path_length``,
    ``layers_per_example``, ``forward_passes_per_example``,
    ``decision_counts`` and ``per_layer_decisions`` (``[L][3]`` counts);
    ``difference`` is routed minus vanilla (``accuracy``, ``layers_per_example``,
    ``mean_path_length``), the ``layers_ratio`` and the paired outcome counts;
    ``examples`` has one entry per example (id, vanilla and routed
    correctness, path, layers...), ``decisions`` the routed path strings.
    """
    if reward not in REWARDS:
        raise ValueError(f"reward must be one of {REWARDS}, got {reward!r}")
    if is_patched(model):
        raise RuntimeError("evaluate() patches the model itself: pass an unpatched model (drllm.unpatch(model))")
    if not examples:
        raise ValueError("no examples to evaluate")
    L = describe(model).num_blocks
    settings = dict(batch_size=batch_size, style=style, normalize=normalize, max_new_tokens=max_new_tokens)

    if baseline is not None:
        if [e["id"] for e in baseline["examples"]] != [e.id for e in examples] or baseline["reward"] != reward:
            raise ValueError("baseline was computed on other examples or with another reward")
        vanilla = [e["vanilla_row"] for e in baseline["examples"]]
    else:
        vanilla = _run(model, tokenizer, examples, reward, False, **settings)
    patch(model, routers, lam=lam, budget=budget)
    try:
        routed = _run(model, tokenizer, examples, reward, True, **settings)
    finally:
        unpatch(model)

    v, r = summarize_rows(vanilla, L), summarize_rows(routed, L)
    pairs = [(a["correct"], b["correct"]) for a, b in zip(vanilla, routed)]
    per_example = []
    for ex, a, b in zip(examples, vanilla, routed):
        entry = {
            "id": ex.id,
            "gold": ex.answer,
            "vanilla_correct": a["correct"],
            "routed_correct": b["correct"],
            "path": b["path"],
            "path_length": _length(b["path"]),
            "vanilla_layers": a["layers"],
            "routed_layers": b["layers"],
            "vanilla_row": a,
            "routed_row": b,
        }
        per_example.append(entry)
    result = {
        "reward": reward,
        "lam": lam,
        "budget": budget,
        "num_blocks": L,
        "n": len(examples),
        "vanilla": v,
        "routed": r,
        "difference": {
            "accuracy": r["accuracy"] - v["accuracy"],
            "layers_per_example": r["layers_per_example"] - v["layers_per_example"],
            "layers_ratio": r["layers_per_example"] / v["layers_per_example"] if v["layers_per_example"] else None,
            "mean_path_length": r["mean_path_length"] - v["mean_path_length"],
            "both_correct": sum(1 for a, b in pairs if a and b),
            "only_vanilla": sum(1 for a, b in pairs if a and not b),
            "only_routed": sum(1 for a, b in pairs if b and not a),
            "neither": sum(1 for a, b in pairs if not a and not b),
        },
        "examples": per_example,
        "decisions": [b["path"] for b in routed],
    }
    if reward == "loglik":
        result["routed"]["inconsistent_paths"] = sum(1 for b in routed if not b["consistent"])
    return result


def lam_sweep(model, tokenizer, routers: Routers, examples: Sequence[Example], lams: Sequence[float], *,
              baseline: dict | None = None, **kwargs) -> list[dict]:
    """:func:`evaluate` at each control-knob value in ``lams``, scoring the vanilla model once (or never,
    given a ``baseline``)."""
    return _sweep(model, tokenizer, routers, examples, [{"lam": float(lam)} for lam in lams], baseline, kwargs)


def budget_sweep(model, tokenizer, routers, examples: Sequence[Example], budgets: Sequence[int], *,
                 baseline: dict | None = None, **kwargs) -> list[dict]:
    """:func:`evaluate` of budget routers at each budget K, scoring the vanilla model once (or never)."""
    return _sweep(model, tokenizer, routers, examples, [{"budget": int(k)} for k in budgets], baseline, kwargs)


def _sweep(model, tokenizer, routers, examples, knobs: list[dict], baseline: dict | None, kwargs: dict) -> list[dict]:
    results: list[dict] = []
    for knob in knobs:
        results.append(evaluate(model, tokenizer, routers, examples, **knob,
                                baseline=results[0] if results else baseline, **kwargs))
    return results


def vanilla_baseline(examples: Sequence[Example], vanilla: list[dict], reward: str) -> dict:
    """Vanilla rows in the shape :func:`evaluate` takes as ``baseline``, so a sweep does not score them again."""
    return {"reward": reward, "examples": [{"id": e.id, "vanilla_row": r} for e, r in zip(examples, vanilla)]}


def evaluate_path(model, tokenizer, examples: Sequence[Example], path: str, *, reward: str = "loglik",
                  batch_size: int = 16, max_new_tokens: int = 256, style: str | None = None,
                  normalize: str = "chars") -> list[dict]:
    """Per-example rows (as in :func:`evaluate`'s ``vanilla_row``) of ``model`` forced onto ``path`` for every input."""
    if reward not in REWARDS:
        raise ValueError(f"reward must be one of {REWARDS}, got {reward!r}")
    with forced_paths(model, [int(c) for c in path]):
        return _run(model, tokenizer, examples, reward, False, batch_size, style, normalize, max_new_tokens, path=path)


def score_paths(model, tokenizer, examples: Sequence[Example], paths: Sequence[str], *, style: str | None = None,
                normalize: str = "chars", max_paths: int = 16, progress: bool = False,
                evaluators: dict | None = None) -> list[list[dict]]:
    """Rows (as :func:`evaluate_path`'s) of every forced path on every example: ``[path][example]``.

    Why: a comparison scores some 25 static paths per item. Here every path
    of one item goes through one :class:`~drllm.search.evaluator.PathEvaluator`
    (log-likelihood, choices packed in one sequence): the default path runs
    once and records the state entering each block, and every other path
    starts at its first edited block from that state, so the blocks before it
    are never recomputed. Same scoring as :func:`evaluate_path` (acc_norm),
    to float tolerance. ``evaluators`` (a dict owned by the caller) keeps each
    item's evaluator between calls, so a path scored once on an item is never
    run again (greedy selection scores overlapping paths step after step).
    """
    rows: list[list[dict]] = [[] for _ in paths]
    for ex in _progress(examples, progress, "forced paths"):
        evaluator = None if evaluators is None else evaluators.get(ex.id)
        if evaluator is None:
            evaluator = PathEvaluator(model, tokenizer, ex, mode="loglik", style=style or "plain",
                                      normalize=normalize, max_paths=max_paths)
            if evaluators is not None:
                evaluators[ex.id] = evaluator
        for out, result in zip(rows, evaluator.evaluate(list(paths))):
            out.append(path_row(ex, result))
    return rows


def path_row(example: Example, result) -> dict:
    """One item's row (as :func:`evaluate_path`'s) from a log-likelihood :class:`~drllm.search.PathResult`."""
    choice = example.labels.index(result.prediction)
    return {"correct": int(choice == example.gold_index), "choice": choice, "margin": result.margin,
            "passes": len(example.choices), "path": result.path, "layers": result.length * len(example.choices)}


def _progress(items, show: bool, desc: str):
    if not show:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit="ex", dynamic_ncols=True)
