"""Budget routers against static skip sets at equal compute: vocabulary, selection, oracle and tables.

Every row skips exactly K blocks, so a budget router at K and ``static:K``
cost the same; the question is only which K blocks. This module scores
forced paths item by item with one :class:`~drllm.search.PathEvaluator` per
item, kept for the whole run (a path never runs twice on an item), and
builds on it:

- :func:`skip_vocabulary`: per K, the greedy static set of the train part,
  then sets chosen greedily on the items every earlier set hurts (correct on
  the default path, wrong on the set): the head ``sets`` chooses among them;
- :func:`score_budget`: per item, the baselines' paths, the routers' picks at
  every K and the oracle (:func:`oracle_path`: the best choice of the
  routers' kind, known from the item's own answer: the upper bound of any
  router choosing among the same options), all in one evaluator.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..paths import path_to_str, skip_set_path
from ..search import PathEvaluator
from ..tasks import Example, encode_prompt
from ..tasks.prompts import cloze_context
from ..train import predict, tap_features
from .baselines import accuracy_scorer, greedy_skip_sets
from .scoring import path_row

__all__ = ["PathScores", "skip_vocabulary", "oracle_path", "budget_picks", "score_budget"]


class PathScores:
    """Results of forced paths on a fixed list of items, each item's evaluator kept (by id, as
    :func:`~drllm.eval.scoring.score_paths` keeps them), so a path never runs twice on an item."""

    def __init__(self, model, tokenizer, examples: Sequence[Example], *, progress: bool = False):
        self.model, self.tokenizer, self.examples = model, tokenizer, list(examples)
        self.progress = progress
        self.evaluators: dict[str, PathEvaluator] = {}

    def evaluator(self, i: int) -> PathEvaluator:
        ex = self.examples[i]
        if ex.id not in self.evaluators:
            self.evaluators[ex.id] = PathEvaluator(self.model, self.tokenizer, ex, max_paths=64)
        return self.evaluators[ex.id]

    @torch.no_grad()
    def correct(self, paths_per_item: Sequence[Sequence[str]], items: Sequence[int] | None = None) -> list[list[int]]:
        """``[item][path]`` correctness (0/1) of each item's own paths."""
        items = range(len(self.examples)) if items is None else items
        rows = zip(items, paths_per_item)
        if self.progress:
            from tqdm.auto import tqdm

            rows = tqdm(list(rows), desc="paths", unit="ex", dynamic_ncols=True)
        return [[path_row(self.examples[i], r)["correct"] for r in self.evaluator(i).evaluate(list(paths))]
                for i, paths in rows]

    def scorer(self, items: Sequence[int]):
        """``score(paths)`` for :func:`greedy_skip_sets` on ``items``: :func:`accuracy_scorer` sharing these
        evaluators."""
        for i in items:
            self.evaluator(i)
        return accuracy_scorer(self.model, self.tokenizer, [self.examples[i] for i in items],
                               evaluators=self.evaluators)


def _restricted(score, allowed: set[int]):
    """``score`` that ranks a path skipping a block outside ``allowed`` last without running it."""

    def restricted(paths: list[str]) -> list[tuple]:
        inside = [p for p in paths if all(c != "0" or i in allowed for i, c in enumerate(p))]
        values = dict(zip(inside, score(inside))) if inside else {}
        return [values.get(p, (-1.0, float("-inf"))) for p in paths]

    return restricted


def skip_vocabulary(scores: PathScores, items: Sequence[int], ks: Sequence[int], size: int, *, allowed: set[int],
                    max_skip_run: int = 2, min_hurt: int = 4) -> dict[int, list[list[int]]]:
    """Up to ``size`` skip sets per K (blocks from ``allowed``), chosen on ``items``: the greedy static set
    (nested over K), then, while at least ``min_hurt`` items are hurt by every set so far, the greedy set of
    those items."""
    L = scores.evaluator(items[0]).num_blocks
    static = greedy_skip_sets(_restricted(scores.scorer(items), allowed), L, max(ks), max_skip_run)
    vanilla = [r[0] for r in scores.correct([["1" * L]] * len(items), items)]
    vocabulary = {}
    for k in ks:
        sets = [static[k]]
        while len(sets) < size:
            paths = [skip_set_path(L, s) for s in sets]
            per_item = scores.correct([paths] * len(items), items)
            hurt = [i for i, v, c in zip(items, vanilla, per_item) if v and not any(c)]
            if len(hurt) < min_hurt:
                break
            found = greedy_skip_sets(_restricted(scores.scorer(hurt), allowed), L, k, max_skip_run)[k]
            if found in sets:
                break
            sets.append(found)
        vocabulary[k] = sets
    return vocabulary


def oracle_path(evaluator: PathEvaluator, routers, k: int) -> str:
    """The item's oracle path at budget ``k`` for routers of this kind, known from its answer: the first
    vocabulary set of size K that answers correctly, else the first set (head ``sets``); the K blocks whose
    single skips cost its gold margin least, under the routers' run limit (head ``blocks``)."""
    L, ex = routers.num_blocks, evaluator.example
    if routers.head == "sets":
        options = [skip_set_path(L, s) for s in routers.sets[k]]
        right = [r.path for r in evaluator.evaluate(options) if path_row(ex, r)["correct"]]
        return right[0] if right else options[0]
    singles = evaluator.evaluate([skip_set_path(L, [b]) for b in range(routers.tap, L)])
    damage = torch.zeros(1, L)
    damage[0, routers.tap:] = torch.tensor([evaluator.default.margin - r.margin for r in singles])
    return path_to_str(routers.pick(damage, k)[0])


@torch.no_grad()
def budget_picks(model, tokenizer, examples: Sequence[Example], routers: dict, budgets: Sequence[int]) -> dict:
    """Each routers' path for each item at each budget (``{name: {K: [path]}}``), as the patched model decides it
    on the item's cloze context: the pick from the state entering the routers' tap on the default path (what the
    runtime pools: tests/test_budget_train.py). One forward per batch of items serves every routers' tap."""
    tokens = [encode_prompt(tokenizer, cloze_context(e, tokenizer, style="plain"), cloze=True) for e in examples]
    features = tap_features(model, tokens, sorted({r.tap for r in routers.values()}))
    predicted = {name: predict(r, *features[r.tap]) for name, r in routers.items()}
    return {name: {k: [path_to_str(p) for p in r.pick(predicted[name], k)] for k in budgets}
            for name, r in routers.items()}


@torch.no_grad()
def score_budget(model, tokenizer, examples: Sequence[Example], common: Sequence[str], routers: dict,
                 budgets: Sequence[int], *, oracle=None, progress: bool = False) -> dict:
    """Rows (as :func:`~drllm.eval.scoring.score_paths`') of every forced path an item needs, one evaluator per
    item, so each path runs once on it: the ``common`` paths, each routers' pick at each budget
    (``routers``: name -> :class:`~drllm.routing.BudgetRouters`) and, given ``oracle`` (budget routers), the
    oracle of that kind. Returns ``{"common": {path: rows}, "picks": {name: {K: rows}}, "oracle": {K: rows}}``."""
    picks = budget_picks(model, tokenizer, examples, routers, budgets)
    out = {"common": {p: [] for p in common}, "picks": {n: {k: [] for k in budgets} for n in routers},
           "oracle": {k: [] for k in budgets} if oracle is not None else {}}
    items = enumerate(examples)
    if progress:
        from tqdm.auto import tqdm

        items = tqdm(list(items), desc="budget paths", unit="ex", dynamic_ncols=True)
    for i, ex in items:
        ev = PathEvaluator(model, tokenizer, ex, max_paths=32)
        mine = [picks[n][k][i] for n in routers for k in budgets]
        ev.evaluate(list(dict.fromkeys([*common, *mine])))  # batched: every path of the item in few calls
        for p in common:
            out["common"][p].append(_row(ev, p))
        for n in routers:
            for k in budgets:
                out["picks"][n][k].append(_row(ev, picks[n][k][i]))
        for k in out["oracle"]:
            out["oracle"][k].append(_row(ev, oracle_path(ev, oracle, k)))
    return out


def _row(evaluator: PathEvaluator, path: str) -> dict:
    """One item's row for ``path`` (memoised by the evaluator)."""
    return path_row(evaluator.example, evaluator.evaluate([path])[0])
