"""Routers against the baselines, on the same items and with the same scoring.

:func:`compare` puts the routers (at several lambdas) beside the baselines of
:mod:`drllm.eval.baselines` (static skip sets, each a forced path through the
same executor): one entry per method and setting, each with accuracy,
interval, measured blocks per pass (two rows are at equal compute only where
these match: :func:`drllm.eval.report.compute_note`) and McNemar's exact test
against vanilla on the same items. :func:`choose_baselines` chooses the skip sets once, so several
data sets can be scored with them.
"""

from __future__ import annotations

import random
from typing import Sequence

from ..paths import skip_set_path
from ..routing import BudgetRouters, Routers
from ..runtime.adapters import describe
from ..tasks import Example
from . import baselines as bl
from .budget import score_budget
from .scoring import budget_sweep, evaluate_path, lam_sweep, score_paths, summarize_rows, vanilla_baseline
from .stats import median_test, paired_test, seeded_accuracy

__all__ = ["compare", "choose_baselines", "RESAMPLED"]

#: The rows of budget routers retrained on resamples of their train and dev parts.
RESAMPLED = "routers-resampled"


def _path_rows(model, tokenizer, examples, paths: Sequence[str], *, reward: str, progress: bool = False,
               **settings) -> dict[str, list[dict]]:
    """Rows of each distinct forced path: all paths of an item in one pass (log-likelihood), else one by one."""
    paths = list(dict.fromkeys(paths))
    if reward == "loglik":
        rows = score_paths(model, tokenizer, examples, paths, style=settings["style"],
                           normalize=settings["normalize"], progress=progress)
    else:
        rows = [evaluate_path(model, tokenizer, examples, p, reward=reward, **settings) for p in paths]
    return dict(zip(paths, rows))


def _entry(method: str, setting, rows: list[dict], vanilla: list[dict], **extra) -> dict:
    """One row of the comparison: accuracy, interval, blocks per pass and the paired test against vanilla."""
    s = summarize_rows(rows, len(rows[0]["path"]))
    return {
        "method": method,
        "setting": setting,
        "n": s["n"],
        "correct": s["correct"],
        "accuracy": s["accuracy"],
        "ci95": s["ci95"],
        "blocks_per_pass": s["mean_path_length"],
        "layers_per_example": s["layers_per_example"],
        "mcnemar": paired_test([r["correct"] for r in vanilla], [r["correct"] for r in rows]),
        "items": "".join(str(r["correct"]) for r in rows),
        **extra,
    }


def _seeded_entry(method: str, setting, runs: list[dict]) -> dict:
    """Several skip sets of one setting (random seeds): their aggregate (:func:`~drllm.eval.stats.seeded_accuracy`:
    the mean, its interval a bootstrap over items), ``mcnemar`` the run with the median p-value; ``runs`` keeps every
    run's own figures."""
    seeded = seeded_accuracy([[int(c) for c in r["items"]] for r in runs])
    return {
        "method": method,
        "setting": setting,
        "n": runs[0]["n"],
        "correct": seeded["correct"],
        "accuracy": seeded["accuracy"],
        "ci95": seeded["ci95"],
        "ci95_method": seeded["ci95_method"],
        "spread": seeded["spread"],
        "blocks_per_pass": sum(r["blocks_per_pass"] for r in runs) / len(runs),
        "layers_per_example": sum(r["layers_per_example"] for r in runs) / len(runs),
        "mcnemar": median_test([r["mcnemar"] for r in runs]),
        **({"skipped": [r["skipped"] for r in runs]} if "skipped" in runs[0] else {}),
        "runs": runs,
    }


def choose_baselines(model, tokenizer, baselines: Sequence[tuple[str, Sequence[int]]], *,
                     calibration: Sequence[Example] = (), seeds: int = bl.SEEDS, reward: str = "loglik",
                     batch_size: int = 16, max_new_tokens: int = 256, style: str | None = None,
                     normalize: str = "chars", shortlist: int | None = None, resamples: int = 0,
                     resample_seed: int = 0) -> tuple[dict, dict]:
    """Each baseline's skip sets per K (:func:`drllm.eval.baselines.choose_skip_sets`) and what chose them, by
    method; chosen once, they can be scored on several data sets (:func:`compare`'s ``skip_sets``).

    ``resamples``: static selection is fragile (the set greedy selection
    finds depends on the items it sees), so ``static`` is also chosen on that
    many bootstrap resamples of the calibration items (same size, seeded),
    reported as ``static-resampled``: the mean and spread of those sets.
    Every static selection shares one evaluator per item, so no path runs
    twice on an item. ``shortlist``: as :func:`drllm.eval.baselines.greedy_skip_sets`.
    """
    sets, info, evaluators = {}, {}, {}
    common = dict(seeds=seeds, reward=reward, style=style, normalize=normalize, batch_size=batch_size,
                  max_new_tokens=max_new_tokens, shortlist=shortlist, evaluators=evaluators)
    for method, ks in baselines:
        sets[method], info[method] = bl.choose_skip_sets(model, tokenizer, method, ks, calibration=calibration,
                                                         **common)
        if method == "static" and resamples:
            rng = random.Random(resample_seed)
            draws = [rng.choices(list(calibration), k=len(calibration)) for _ in range(resamples)]
            chosen = [bl.choose_skip_sets(model, tokenizer, method, ks, calibration=d, **common)[0] for d in draws]
            sets["static-resampled"] = {k: [c[k][0] for c in chosen] for k in ks}
            info["static-resampled"] = {"resamples": resamples, "seed": resample_seed,
                                        "calibration_ids": [[e.id for e in d] for d in draws]}
    return sets, info


def compare(model, tokenizer, examples: Sequence[Example], *, routers: Routers | BudgetRouters | None = None,
            lams: Sequence[float] = (0.0,), budgets: Sequence[int] = (), baselines: Sequence[tuple[str, Sequence[int]]] = (),
            calibration: Sequence[Example] = (), seeds: int = bl.SEEDS, reward: str = "loglik",
            batch_size: int = 16, max_new_tokens: int = 256, style: str | None = None,
            normalize: str = "chars", skip_sets: tuple[dict, dict] | None = None, shortlist: int | None = None,
            resamples: int = 0, label_free: BudgetRouters | None = None, resampled: Sequence[BudgetRouters] = (),
            progress: bool = False) -> dict:
    """Vanilla, the routers at each of ``lams`` (budget routers: at each of ``budgets``, with the oracle of their
    kind, :func:`~drllm.eval.budget.oracle_path`) and every baseline ``(method, Ks)`` on the same ``examples``.

    ``calibration`` (ShortGPT prompts, the static selection set) must share
    no item with ``examples``; ``skip_sets``, a :func:`choose_baselines`
    result, stands in for ``baselines`` and ``calibration``. Vanilla (the
    all-ones path) and every baseline are forced paths, scored together
    (:func:`~drllm.eval.scoring.score_paths`). Returns ``{"methods", "sweep", "baselines"}``:
    ``methods`` one entry per method and setting (K, or lambda for routers),
    each with ``items``, its per-example correctness as a 0/1 string;
    ``sweep`` the :func:`~drllm.eval.scoring.lam_sweep` results; ``baselines`` what chose each
    method's skip sets (calibration ids, block influence). ``label_free``: budget routers trained without gold
    labels, scored at the same ``budgets`` as rows of method ``routers label-free`` (their sweep: ``label_free``).
    ``resampled``: the routers retrained on resamples of their train and dev parts
    (:func:`~drllm.eval.budget_selection.select_budget_routers`), one ``routers-resampled`` row per budget: their
    mean and spread, as ``static-resampled``'s.
    """
    bl.check_disjoint(calibration, examples)
    settings = dict(batch_size=batch_size, max_new_tokens=max_new_tokens, style=style, normalize=normalize)
    if skip_sets is None:
        skip_sets = choose_baselines(model, tokenizer, baselines, calibration=calibration, seeds=seeds,
                                     reward=reward, shortlist=shortlist, resamples=resamples, **settings)
    sets, chosen = skip_sets
    L = describe(model).num_blocks
    forced = ["1" * L] + [skip_set_path(L, s) for by_k in sets.values() for ss in by_k.values() for s in ss]
    budgeted = {}
    # budget routers by row name; each retrain on a resample is a run of the routers-resampled rows
    named = {"routers": routers, **({"routers label-free": label_free} if label_free is not None else {}),
             **{f"{RESAMPLED} {r}": twin for r, twin in enumerate(resampled)}}
    if isinstance(routers, BudgetRouters) and reward == "loglik":
        # the routers' paths are decided on each item's context as the runtime decides them, then scored with
        # the baselines' in one evaluator per item (a routed run per budget would cost some 8 forced paths)
        scored = score_budget(model, tokenizer, examples, list(dict.fromkeys(forced)), named, budgets,
                              oracle=routers, progress=progress)
        rows = scored["common"]
        sweeps = {name: _budget_sweep(picks, L) for name, picks in scored["picks"].items()}
        budgeted = {**scored["picks"], "oracle": scored["oracle"]}
    else:
        rows = _path_rows(model, tokenizer, examples, forced, reward=reward, progress=progress, **settings)
        baseline = vanilla_baseline(examples, rows["1" * L], reward) if routers is not None else None
        if isinstance(routers, BudgetRouters):
            sweeps = {name: budget_sweep(model, tokenizer, r, examples, budgets, reward=reward, baseline=baseline,
                                         **settings) for name, r in named.items()}
        else:
            sweeps = {"routers": lam_sweep(model, tokenizer, routers, examples, lams, reward=reward,
                                           baseline=baseline, **settings)} if routers is not None else {}
        for method, results in sweeps.items():
            for r in results:
                budgeted.setdefault(method, {})[r["budget"] if r["budget"] is not None else r["lam"]] = \
                    [e["routed_row"] for e in r["examples"]]
    sweep, free = sweeps.get("routers", []), sweeps.get("routers label-free", [])
    vanilla = rows["1" * L]
    methods = [_entry("vanilla", None, vanilla, vanilla)]
    for method, by_k in budgeted.items():
        if method.startswith(RESAMPLED + " "):
            continue
        for k, rows_k in by_k.items():
            if isinstance(routers, BudgetRouters):
                setting = k if method == "oracle" else f"budget {k}"
                methods.append(_entry(method, setting, rows_k, vanilla, budget=k))
            else:
                methods.append(_entry(method, k, rows_k, vanilla))
    for k in budgets if resampled else ():
        runs = [_entry(RESAMPLED, f"budget {k}", budgeted[f"{RESAMPLED} {r}"][k], vanilla, budget=k)
                for r in range(len(resampled))]
        methods.append({**_seeded_entry(RESAMPLED, f"budget {k}", runs), "budget": k})
    for method, by_k in sets.items():
        for k, skip_lists in by_k.items():
            runs = [_entry(method, k, rows[skip_set_path(L, s)], vanilla, skipped=s) for s in skip_lists]
            methods.append(_seeded_entry(method, k, runs) if len(runs) > 1 else runs[0])
    return {"methods": methods, "sweep": sweep, "label_free": free, "baselines": chosen}


def _budget_sweep(picks: dict[int, list[dict]], num_blocks: int) -> list[dict]:
    """What a budget sweep reports per budget (decisions and their summary), from the rows of forced picks."""
    return [{"budget": k, "lam": 0.0, "n": len(rows), "decisions": [r["path"] for r in rows],
             "routed": summarize_rows(rows, num_blocks)} for k, rows in picks.items()]
