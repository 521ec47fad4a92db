"""Budget routers against static skip sets at equal compute: vocabulary, selection, oracle and tables.

Every row skips exactly K blocks, so a budget router at K and ``static:K``
cost the same; the question is only which K blocks. This module scores
forced paths item by item with one :class:`~drllm.search.PathEvaluator` per
item, kept for the whole run (a path never runs twice on an item), and
builds on it:

- :func:`skip_vocabulary`: per K, the greedy static set of the train part,
  then sets chosen greedily on the items every earlier set hurts (correct on
  the default path, wrong on the set): the head ``sets`` chooses among them;
- :func:`budget_table`: per K, the accuracy of static sets, the routers'
  picks and the oracle (the best choice per item, known from the item's own
  answer: the upper bound of any router choosing among the same options).
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..paths import path_to_str, skip_set_path
from ..search import PathEvaluator
from ..tasks import Example
from .baselines import greedy_skip_sets
from .stats import paired_test, wilson_interval

__all__ = ["PathScores", "skip_vocabulary", "oracle_correct", "budget_table", "budget_oracle"]


class PathScores:
    """Results of forced paths on a fixed list of items, memoised per item (log-likelihood, acc_norm)."""

    def __init__(self, model, tokenizer, examples: Sequence[Example], *, max_paths: int = 64, progress: bool = False):
        self.model, self.tokenizer, self.examples = model, tokenizer, list(examples)
        self.max_paths, self.progress = max_paths, progress
        self.evaluators: dict[int, PathEvaluator] = {}

    def evaluator(self, i: int) -> PathEvaluator:
        if i not in self.evaluators:
            self.evaluators[i] = PathEvaluator(self.model, self.tokenizer, self.examples[i], max_paths=self.max_paths)
        return self.evaluators[i]

    @torch.no_grad()
    def correct(self, paths_per_item: Sequence[Sequence[str]], items: Sequence[int] | None = None) -> list[list[int]]:
        """``[item][path]`` correctness (0/1) of each item's own paths."""
        items = range(len(self.examples)) if items is None else items
        rows = zip(items, paths_per_item)
        if self.progress:
            from tqdm.auto import tqdm

            rows = tqdm(list(rows), desc="paths", unit="ex", dynamic_ncols=True)
        out = []
        for i, paths in rows:
            results = self.evaluator(i).evaluate(list(paths))
            gold = self.examples[i].gold_index
            out.append([int(self.examples[i].labels.index(r.prediction) == gold) for r in results])
        return out

    def scorer(self, items: Sequence[int]):
        """``score(paths)`` for :func:`greedy_skip_sets`: ``(accuracy, mean margin)`` of each path on ``items``."""

        def score(paths: list[str]) -> list[tuple]:
            sums = [[0.0, 0.0] for _ in paths]
            for i in items:
                for s, r in zip(sums, self.evaluator(i).evaluate(paths)):
                    s[0] += r.reward
                    s[1] += r.margin
            return [(a / len(items), m / len(items)) for a, m in sums]

        return score


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


def oracle_correct(options: Sequence[Sequence[int]]) -> list[int]:
    """Per item, 1 when any of its options (0/1 correctness) is correct: the best choice known from the answer."""
    return [int(any(o)) for o in options]


def budget_table(methods: dict[str, dict[int, list[int]]], vanilla: Sequence[int], blocks_per_pass: dict[int, float],
                 against: str = "static") -> list[dict]:
    """One entry per (method, K): accuracy, Wilson interval, blocks per pass, McNemar against vanilla and
    against ``against`` at the same K (equal compute: every method at K runs the same blocks per pass)."""
    rows = [{"method": "vanilla", "budget": 0, "accuracy": sum(vanilla) / len(vanilla),
             "ci95": list(wilson_interval(sum(vanilla), len(vanilla))), "blocks_per_pass": None}]
    for name, by_k in methods.items():
        for k, items in sorted(by_k.items()):
            entry = {"method": name, "budget": k, "n": len(items), "accuracy": sum(items) / len(items),
                     "ci95": list(wilson_interval(sum(items), len(items))), "blocks_per_pass": blocks_per_pass[k],
                     "mcnemar_vs_vanilla": paired_test(vanilla, items), "items": "".join(map(str, items))}
            if name != against and k in methods.get(against, {}):
                entry[f"mcnemar_vs_{against}"] = paired_test(methods[against][k], items)
            rows.append(entry)
    return rows



@torch.no_grad()
def budget_oracle(model, tokenizer, examples: Sequence[Example], routers, budgets: Sequence[int], *,
                  progress: bool = False) -> dict[int, tuple[list[str], list[int]]]:
    """Per budget K, each item's oracle path and its correctness: the best choice of the routers' kind known from
    the item's own answer, the upper bound of any router of that kind.

    Head ``sets``: the first vocabulary set of size K that answers the item
    correctly (else the first set). Head ``blocks``: the K blocks whose single
    skips cost the item's gold margin least, under the routers' run limit
    (:meth:`~drllm.routing.BudgetRouters.pick` on the measured damages); this
    costs every single skip from the tap on, per item.
    """
    L = routers.num_blocks
    out: dict[int, tuple[list[str], list[int]]] = {k: ([], []) for k in budgets}
    items = examples
    if progress:
        from tqdm.auto import tqdm

        items = tqdm(examples, desc="oracle", unit="ex", dynamic_ncols=True)
    for ex in items:
        ev = PathEvaluator(model, tokenizer, ex)
        if routers.head == "sets":
            options = {k: [skip_set_path(L, s) for s in routers.sets[k]] for k in budgets}
        else:
            singles = ev.evaluate([skip_set_path(L, [b]) for b in range(routers.tap, L)])
            damage = torch.zeros(1, L)
            damage[0, routers.tap:] = torch.tensor([ev.default.margin - r.margin for r in singles])
            options = {k: [path_to_str(routers.pick(damage, k)[0])] for k in budgets}
        for k in budgets:
            results = ev.evaluate(options[k])
            right = [r.path for r in results if ex.labels.index(r.prediction) == ex.gold_index]
            out[k][0].append(right[0] if right else options[k][0])
            out[k][1].append(int(bool(right)))
    return out
