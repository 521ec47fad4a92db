"""Budget routers, end to end: damage on the train part, a skip-set vocabulary, both heads, chosen on dev.

Why here: choosing among heads and targets is scoring on top of training,
as :mod:`~drllm.eval.selection` is for the paper's routers. The searched
train items are split as ``drllm train`` splits them (:func:`~drllm.train.split_dev`):

1. the damage of every single skip from the tap on, on the train part
   (:func:`~drllm.train.measure_damage`, resumable);
2. the blocks greedy selection may use: the ``allowed`` least damaging ones
   on the train part (a greedy step scores each of them on every item);
3. the vocabulary (:func:`~drllm.eval.budget.skip_vocabulary`) on the
   first ``vocabulary_items`` train items, and its sets' damage on the train part;
4. four candidates, heads ``blocks`` and ``sets`` times targets ``margin``
   and ``kl`` (:func:`~drllm.train.fit_budget_routers`), each keeping the
   epoch of least dev loss;
5. every candidate's picks scored on the dev items at every budget; the
   highest mean dev accuracy over the budgets wins, and the best ``kl``
   candidate (no gold label read in training) is kept as ``label-free/``.

``out_dir`` then holds the chosen routers and ``selection.json`` (the dev
table, the vocabulary, the dev ids and their task, the default budget:
the largest whose dev accuracy stays inside vanilla's 95% interval).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..artifacts import exclusive_lock, read_json, write_json
from ..paths import path_to_str
from ..routing import BudgetRouters
from ..tasks import Example, encode_prompt
from ..tasks.prompts import cloze_context
from ..train import (BudgetConfig, damage_targets, fit_budget_routers, measure_damage, predict, split_dev,
                     tap_features)
from .budget import PathScores, oracle_path, skip_vocabulary
from .stats import wilson_interval

__all__ = ["BudgetSettings", "select_budget_routers", "HEADS", "TARGETS"]

HEADS = ("blocks", "sets")
TARGETS = ("margin", "kl")
RULE = "highest mean dev accuracy over the budgets, then head 'sets', then target 'margin'"


@dataclass(frozen=True)
class BudgetSettings:
    """What :func:`select_budget_routers` builds; the defaults fit a 2-core CPU and a 30-block model."""

    budgets: tuple[int, ...] = (1, 2, 4, 6, 8)
    tap: int = 2
    vocabulary_size: int = 3
    vocabulary_items: int = 80
    allowed: int = 10
    dev_fraction: float = 0.2
    seed: int = 0
    epochs: int = 200


def select_budget_routers(model, tokenizer, examples: Sequence[Example], out_dir: str | Path, *,
                          settings: BudgetSettings = BudgetSettings(), progress: bool = True,
                          log: Callable[[str], None] = print) -> dict:
    """Build, fit and choose budget routers for ``model`` from ``examples`` (train-split items); returns the
    selection written to ``out_dir/selection.json``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(out):
        return _select(model, tokenizer, list(examples), out, settings, progress, log)


def _select(model, tokenizer, examples, out: Path, s: BudgetSettings, progress: bool, log) -> dict:
    start = time.perf_counter()
    L = model.config.num_hidden_layers
    train_idx, dev_idx = split_dev(len(examples), s.dev_fraction, s.seed)
    if not dev_idx:
        raise ValueError("budget routers are chosen on a dev part: give at least two items and dev_fraction > 0")
    train, dev = [examples[i] for i in train_idx], [examples[i] for i in dev_idx]
    singles = [[b] for b in range(s.tap, L)]
    log(f"budget routers: {len(train)} train and {len(dev)} dev items, tap {s.tap}, budgets {list(s.budgets)}")
    single = measure_damage(model, tokenizer, train, out / "damage-single.jsonl", candidates=singles,
                            progress=progress)
    mean = torch.tensor([r["margin"] for r in single]).mean(0)
    allowed = sorted((mean.argsort()[: s.allowed] + s.tap).tolist())
    log(f"blocks the vocabulary may skip (least mean damage on the train part): {allowed}")
    vocabulary = _vocabulary(model, tokenizer, train[: s.vocabulary_items], allowed, s, out / "vocabulary.json",
                             progress)
    log("vocabulary: " + "; ".join(f"K={k}: {v}" for k, v in vocabulary.items()))
    sets = [x for k in s.budgets for x in vocabulary[k]]
    in_vocabulary = measure_damage(model, tokenizer, train, out / "damage-vocabulary.jsonl", candidates=sets,
                                   progress=progress)
    features = {name: tap_features(model, [_tokens(tokenizer, e) for e in items], [s.tap])[s.tap]
                for name, items in (("train", train), ("dev", dev))}
    measured = singles + [x for x in sets if x not in singles]  # a K = 1 set is a single skip
    dev_damage = measure_damage(model, tokenizer, dev, out / "damage-dev.jsonl", candidates=measured,
                                progress=progress)
    candidates = {}
    for head in HEADS:
        for target in TARGETS:
            torch.manual_seed(s.seed)  # the same initialisation on a rerun
            routers = BudgetRouters.for_model(model, tap=s.tap, head=head, sets=vocabulary if head == "sets" else None)
            train_records, train_candidates = (single, singles) if head == "blocks" else (in_vocabulary, sets)
            fit = fit_budget_routers(
                routers, (*features["train"], damage_targets(train_records, train_candidates, routers, target)),
                (*features["dev"], damage_targets(dev_damage, measured, routers, target)),
                BudgetConfig(head=head, target=target, epochs=s.epochs, seed=s.seed))
            routers.save_pretrained(out / "candidates" / f"{head}-{target}")
            candidates[(head, target)] = (routers, fit)
    scores = PathScores(model, tokenizer, dev, progress=progress)
    vanilla = [c[0] for c in scores.correct([["1" * L]] * len(dev))]
    table = []
    for (head, target), (routers, fit) in candidates.items():
        with torch.no_grad():
            predicted = predict(routers, *features["dev"])
        per_k = {}
        for k in s.budgets:
            picks = [[path_to_str(p)] for p in routers.pick(predicted, k)]
            correct = [c[0] for c in scores.correct(picks)]
            per_k[str(k)] = {"accuracy": sum(correct) / len(dev), "ci95": list(wilson_interval(sum(correct), len(dev))),
                             "items": "".join(map(str, correct))}
        mean_acc = sum(v["accuracy"] for v in per_k.values()) / len(per_k)
        table.append({"head": head, "target": target, "epoch": fit["epoch"], "mean_accuracy": mean_acc,
                      "budgets": per_k})
        log(f"dev: head {head}, target {target}: mean accuracy {mean_acc:.3f} over budgets "
            + ", ".join(f"K={k} {v['accuracy']:.3f}" for k, v in per_k.items()))
    oracle = _dev_oracle(scores, candidates, s)
    order = {("sets", "margin"): 0, ("sets", "kl"): 1, ("blocks", "margin"): 2, ("blocks", "kl"): 3}
    best = min(table, key=lambda e: (-e["mean_accuracy"], order[(e["head"], e["target"])]))
    label_free = min((e for e in table if e["target"] == "kl"), key=lambda e: -e["mean_accuracy"])
    candidates[(best["head"], best["target"])][0].save_pretrained(out)
    candidates[(label_free["head"], "kl")][0].save_pretrained(out / "label-free")
    lo, _ = wilson_interval(sum(vanilla), len(dev))
    inside = [k for k in s.budgets if best["budgets"][str(k)]["accuracy"] >= lo]
    selection = {
        "kind": "budget",
        "lam": 0.0,
        "budget": max(inside, default=0),
        "budgets": list(s.budgets),
        "head": best["head"],
        "target": best["target"],
        "label_free": {"head": label_free["head"], "target": "kl"},
        "tap": s.tap,
        "allowed": allowed,
        "vocabulary": {str(k): v for k, v in vocabulary.items()},
        "dev": len(dev),
        "train": len(train),
        "dev_ids": [e.id for e in dev],
        "task": dev[0].task,
        "seed": s.seed,
        "dev_vanilla": {"accuracy": sum(vanilla) / len(dev), "ci95": list(wilson_interval(sum(vanilla), len(dev))),
                        "n": len(dev), "items": "".join(map(str, vanilla))},
        "scored": table,
        "dev_oracle": oracle,
        "rule": RULE,
        "settings": asdict(s),
        "seconds": round(time.perf_counter() - start, 1),
    }
    write_json(out / "selection.json", selection)
    return selection


def _dev_oracle(scores: PathScores, candidates: dict, s: BudgetSettings) -> dict[str, dict[str, float]]:
    """Dev accuracy of each head's oracle (:func:`~drllm.eval.budget.oracle_path`): the most a router of that
    kind could reach on these items."""
    n = len(scores.examples)
    return {head: {str(k): sum(c[0] for c in scores.correct(
        [[oracle_path(scores.evaluator(i), candidates[(head, "margin")][0], k)] for i in range(n)])) / n
        for k in s.budgets} for head in HEADS}


def _vocabulary(model, tokenizer, items: list[Example], allowed: list[int], s: BudgetSettings, path: Path,
                progress: bool) -> dict[int, list[list[int]]]:
    """:func:`skip_vocabulary` on ``items``, kept in ``path`` with what it was built from (a rerun with the same
    inputs reads it back instead of scoring again)."""
    made_from = {"items": [e.id for e in items], "allowed": allowed, "budgets": list(s.budgets),
                 "size": s.vocabulary_size}
    if path.is_file():
        kept = read_json(path, "delete it to build the vocabulary again")
        if isinstance(kept, dict) and kept.get("made_from") == made_from:
            return {int(k): v for k, v in kept["vocabulary"].items()}
    vocabulary = skip_vocabulary(PathScores(model, tokenizer, items, progress=progress), list(range(len(items))),
                                 s.budgets, s.vocabulary_size, allowed=set(allowed))
    write_json(path, {"made_from": made_from, "vocabulary": {str(k): v for k, v in vocabulary.items()}})
    return vocabulary


def _tokens(tokenizer: Any, example: Example) -> list[int]:
    """The routing context's tokens: what the runtime pools over when a continuation is scored."""
    return encode_prompt(tokenizer, cloze_context(example, tokenizer, style="plain"), cloze=True)
