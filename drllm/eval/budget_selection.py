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
   candidate (no gold label read in training) is kept as ``label-free/``;
6. the winner's head and target retrained on ``resamples`` bootstrap
   resamples of the train part, each keeping the epoch of least loss on a
   bootstrap resample of the dev part (the same draws static selection is
   repeated on: :func:`~drllm.eval.compare.choose_baselines`), kept as
   ``resampled/0``, ``resampled/1``, ...: ``drllm eval`` reports them as
   ``routers-resampled``, the mean and spread that say how fragile the
   routers are next to ``static-resampled``.

``out_dir`` then holds the chosen routers and ``selection.json`` (the dev
table, the vocabulary, the dev ids and their task, the default budget:
the largest whose dev accuracy stays inside vanilla's 95% interval).
"""

from __future__ import annotations

import random
import shutil
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

__all__ = ["BudgetSettings", "select_budget_routers", "saved_companions", "HEADS", "TARGETS", "LABEL_FREE",
           "RESAMPLED"]

HEADS = ("blocks", "sets")
TARGETS = ("margin", "kl")
#: Folders beside the chosen routers: the best routers trained on KL alone, and the resampled retrains.
LABEL_FREE = "label-free"
RESAMPLED = "resampled"
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
    resamples: int = 3
    resample_seed: int = 0


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

    def fit_candidate(head: str, target: str, train_rows=None, dev_rows=None) -> tuple[BudgetRouters, dict]:
        """Routers of ``head`` fitted on ``target`` (on the given rows of the train and dev parts: all by default)."""
        torch.manual_seed(s.seed)  # the same initialisation on a rerun
        routers = BudgetRouters.for_model(model, tap=s.tap, head=head, sets=vocabulary if head == "sets" else None)
        train_records, train_candidates = (single, singles) if head == "blocks" else (in_vocabulary, sets)
        parts = []
        for (means, valid), damage, rows in (
                (features["train"], damage_targets(train_records, train_candidates, routers, target), train_rows),
                (features["dev"], damage_targets(dev_damage, measured, routers, target), dev_rows)):
            rows = torch.arange(len(damage)) if rows is None else torch.tensor(rows)
            parts.append((means[rows], valid[rows], damage[rows]))
        return routers, fit_budget_routers(routers, *parts, BudgetConfig(head=head, target=target, epochs=s.epochs,
                                                                         seed=s.seed))

    candidates = {}
    for head in HEADS:
        for target in TARGETS:
            candidates[(head, target)] = fit_candidate(head, target)
            candidates[(head, target)][0].save_pretrained(out / "candidates" / f"{head}-{target}")
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
    candidates[(label_free["head"], "kl")][0].save_pretrained(out / LABEL_FREE)
    shutil.rmtree(out / RESAMPLED, ignore_errors=True)  # no retrain of an earlier run is read as this run's
    resampled = _resample_draws(len(train), len(dev), s)
    for r, (train_rows, dev_rows) in enumerate(resampled):
        fit_candidate(best["head"], best["target"], train_rows, dev_rows)[0].save_pretrained(out / RESAMPLED / str(r))
    if resampled:
        log(f"head {best['head']}, target {best['target']} retrained on {len(resampled)} bootstrap resamples "
            f"(kept in {RESAMPLED}/)")
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
        "resampled": {"count": len(resampled), "seed": s.resample_seed,
                      "dev_ids": [[dev[i].id for i in rows] for _, rows in resampled]},
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


def _resample_draws(n_train: int, n_dev: int, s: BudgetSettings) -> list[tuple[list[int], list[int]]]:
    """``(train rows, dev rows)`` of each resample: bootstrap draws of the same sizes. The dev draws are the ones
    :func:`~drllm.eval.compare.choose_baselines` makes of the same dev part with the same seed, so
    ``routers-resampled`` and ``static-resampled`` see the same dev items."""
    dev_rng, train_rng = random.Random(s.resample_seed), random.Random(f"train {s.resample_seed}")
    dev_draws = [dev_rng.choices(range(n_dev), k=n_dev) for _ in range(s.resamples)]
    return [(train_rng.choices(range(n_train), k=n_train), rows) for rows in dev_draws]


def saved_companions(routers_dir: str | Path, selection: dict | None) -> tuple[BudgetRouters | None, list]:
    """The label-free routers and the resampled retrains kept beside budget routers (each None / empty when
    absent: routers from an older run)."""
    root = Path(routers_dir)
    free = BudgetRouters.from_pretrained(root / LABEL_FREE) if (root / LABEL_FREE).is_dir() else None
    count = (selection or {}).get("resampled", {}).get("count", 0)
    return free, [BudgetRouters.from_pretrained(root / RESAMPLED / str(r)) for r in range(count)]


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
