"""Choosing the knobs on the dev part: ``min_margin``, then the control knob lambda.

Why: a knob compared on the items a report then scores makes that report's
figure the best of several draws, not a measurement. So the searched (train
split) items are split into a train and a dev part (:func:`~drllm.train.split_dev`),
routers are trained on the train part once per ``min_margin`` of a small
grid (each keeping its best epoch by dev loss, :func:`~drllm.train.train_routers`), and
the frozen model with each candidate's routers is scored on the dev items
with the evaluation's own code (:func:`drllm.eval.scoring.evaluate`): first every
margin at lambda 0, then the chosen margin's routers at every lambda of its
grid. The best is the highest dev accuracy; ties go to the fewest blocks per
pass, then to the value scored first (margins in grid order, lambda 0 first). Nothing here reads another split: the
dev items come from the search records themselves.

The chosen values and the dev figures they were chosen on are written next
to the routers (``selection.json``, :func:`read_selection`), with the task
the dev part was drawn from; ``drllm eval`` and ``drllm generate`` route at
the chosen knobs unless given others (:func:`routing_knobs`) and calibrate
baselines on that dev part (:func:`routers_dev_part`). It lives in
eval, not train: choosing is scoring on top of training (eval imports train,
never the reverse).
"""

from __future__ import annotations

import math
import os
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from ..artifacts import ArtifactError, exclusive_lock, read_json, write_json
from ..routing.budget import HEADS
from ..routing.routers import Routers
from ..tasks import TASKS, Example
from ..train.budget import TARGETS
from ..train.loop import TrainConfig, train_routers
from ..train.records import read_path_records, record_example
from .scoring import evaluate

__all__ = ["MARGINS", "LAMS", "SELECTION_NAME", "ROUTING_KNOBS", "select_routers", "read_selection", "routing_knobs",
           "routers_dev_part"]

#: Grids searched when none is given (``drllm train --min-margin/--lam``).
MARGINS = (0.1, 0.2, 0.4)
LAMS = (-0.25, 0.0, 0.25)
SELECTION_NAME = "selection.json"
CANDIDATES = "candidates"
RULE = "highest dev accuracy, then fewest blocks per pass, then the value scored first (grid order, lambda 0 first)"
#: The knobs routing reads back from ``selection.json`` (``drllm eval``, ``drllm generate``), each with its value when
#: the routers hold no selection: lambda for the paper's routers, the budget (blocks skipped per row) for budget
#: routers (None: none chosen). A knob given on the command line wins.
ROUTING_KNOBS = {"lam": 0.0, "budget": None}
#: What each kind of selection record must hold: the paper's routers (:func:`select_routers`, no ``kind``) and budget
#: routers (:func:`drllm.eval.budget_selection.select_budget_routers`, ``"kind": "budget"``).
REQUIRED = {"paper": {"min_margin", "lam", "epoch", "dev_ids"},
            "budget": {"kind", "budget", "budgets", "head", "target", "dev_ids"}}


def select_routers(
    model: torch.nn.Module,
    tokenizer: Any,
    paths_file: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    config: TrainConfig | None = None,
    margins: Sequence[float] = MARGINS,
    lams: Sequence[float] = LAMS,
    skips_file: str | os.PathLike | None = None,
    examples: Mapping[str, Example] | None = None,
    batch_size: int = 16,
    callback: Callable[[int, dict], None] | None = None,
) -> dict:
    """Train one candidate per margin into ``out_dir/candidates/``, choose on the dev part, and write the
    chosen routers and ``selection.json`` to ``out_dir``.

    A grid of one value fixes that knob; with both fixed nothing is scored.
    ``examples`` (by id) stand in for the items of records written by an
    older search, which carry none. Returns the selection (as written) plus
    ``run``, the chosen candidate's :func:`train_routers` result.
    """
    config = config or TrainConfig()
    margins, lams = [float(m) for m in margins], [float(x) for x in lams]
    if not margins or not lams:
        raise ValueError("margins and lams need at least one value each")
    out = Path(out_dir)
    with exclusive_lock(out):
        shared = replace(config, cache_dir=config.cache_dir or str(out / "cache"))
        runs = [train_routers(model, tokenizer, paths_file, out / CANDIDATES / f"margin-{m:g}",
                              config=replace(shared, min_margin=m), skips_file=skips_file, callback=callback)
                for m in margins]
        candidates = [Routers.from_pretrained(r["out_dir"]) for r in runs]
        by_id = {r.get("id"): r for r in read_path_records(paths_file)}
        if len(margins) * len(lams) > 1:
            chosen = _choose(model, tokenizer, by_id, runs, candidates, margins, lams, examples, batch_size)
        else:
            chosen = {"index": 0, "lam": lams[0], "dev_vanilla": None, "scored": []}
        run = runs[chosen["index"]]
        candidates[chosen["index"]].save_pretrained(out)
        selection = {
            "min_margin": margins[chosen["index"]],
            "lam": chosen["lam"],
            "epoch": run["epoch"],
            "shared_skip": run["shared_skip"],
            "min_block_labels": config.min_block_labels,
            "dev_fraction": config.dev_fraction,
            "seed": config.seed,
            "train": run["train"],
            "dev": run["dev"],
            "dev_ids": run["dev_ids"],
            "task": _dev_task(by_id, run["dev_ids"]),
            "margins": margins,
            "lams": lams,
            "rule": RULE,
            "dev_vanilla": chosen["dev_vanilla"],
            "scored": chosen["scored"],
        }
        write_json(out / SELECTION_NAME, selection)
    return {**selection, "run": run}


def _dev_task(by_id: Mapping[str, dict], dev_ids: Sequence[str]) -> str | None:
    """The task the dev part's records were searched on (None when they name none, or several): baselines
    calibrated on that dev part read its train split, whatever task is evaluated."""
    tasks = {by_id[i].get("task") for i in dev_ids if i in by_id}
    return tasks.pop() if len(tasks) == 1 else None


def _choose(model, tokenizer, by_id, runs, candidates, margins, lams, examples, batch_size) -> dict:
    """Score the candidates on the dev part: every margin at lambda 0 (else the grid's first), then the best
    margin at every lambda."""
    dev_ids = runs[0]["dev_ids"]
    if not dev_ids:
        raise ValueError("no dev part to choose the knobs on (too few records, or dev_fraction 0): "
                         "give one value of each knob")
    items = [record_example(by_id[i], examples) for i in dev_ids]
    reward = by_id[dev_ids[0]].get("reward_mode") or "loglik"
    first_lam = 0.0 if 0.0 in lams else lams[0]
    vanilla = None
    scored = []

    def score(index: int, lam: float) -> dict:
        nonlocal vanilla
        result = evaluate(model, tokenizer, candidates[index], items, reward=reward, lam=lam, baseline=vanilla,
                          batch_size=batch_size)
        vanilla = vanilla or result
        r = result["routed"]
        entry = {"min_margin": margins[index], "lam": lam, "epoch": runs[index]["epoch"], "accuracy": r["accuracy"],
                 "ci95": r["ci95"], "blocks_per_pass": r["mean_path_length"], "index": index}
        scored.append(entry)
        return entry

    best = _best([score(i, first_lam) for i in range(len(margins))])
    best = _best([best] + [score(best["index"], lam) for lam in lams if lam != first_lam])
    v = vanilla["vanilla"]
    return {"index": best["index"], "lam": best["lam"],
            "scored": [{k: e[k] for k in e if k != "index"} for e in scored],
            "dev_vanilla": {"accuracy": v["accuracy"], "ci95": v["ci95"], "n": v["n"]}}


def _best(entries: list[dict]) -> dict:
    """The highest accuracy, then the fewest blocks per pass, then the first of ``entries``."""
    return min(entries, key=lambda e: (-e["accuracy"], e["blocks_per_pass"]))


def read_selection(routers_dir: str | os.PathLike) -> dict | None:
    """The ``selection.json`` beside routers (None when they were not chosen this way), its fields checked
    before use: the routing knobs (lambda; for budget routers, ``"kind": "budget"``, the budget, the budgets,
    the head and the target), the dev ids and the task."""
    path = Path(routers_dir) / SELECTION_NAME
    if not path.is_file():
        return None
    fix = "delete it, or train the routers again"
    selection = read_json(path, fix)
    if not isinstance(selection, dict):
        raise ArtifactError(f"{path}: not a selection record of drllm train (not a JSON object): {fix}")
    kind = selection.get("kind", "paper")
    if kind not in REQUIRED:
        raise ArtifactError(f"{path}: not a selection record of drllm train ('kind' is {kind!r}, not 'budget'): {fix}")
    if not REQUIRED[kind] <= set(selection):
        raise ArtifactError(f"{path}: not a selection record of drllm train (it lacks "
                            f"{', '.join(sorted(REQUIRED[kind] - set(selection)))}): {fix}")
    if kind == "budget":
        _check_budget_selection(selection, path, fix)
    if kind == "paper" or "lam" in selection:
        lam = selection["lam"]
        if _not_number(lam) or not math.isfinite(lam) or not -1 <= lam <= 1:
            raise ArtifactError(f"{path}: 'lam' must be a number in [-1, 1], got {lam!r}: {fix}")
    ids = selection["dev_ids"]
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise ArtifactError(f"{path}: 'dev_ids' must be a list of item ids: {fix}")
    if selection.get("task") is not None and selection["task"] not in TASKS:
        raise ArtifactError(f"{path}: 'task' must be one of {', '.join(TASKS)}, got {selection['task']!r}: {fix}")
    return selection


def _not_number(value) -> bool:
    return isinstance(value, bool) or not isinstance(value, (int, float))


def _check_budget_selection(selection: dict, path: Path, fix: str) -> None:
    """The knobs of a budget routers' record: the default budget (an int >= 0), the budgets compared on dev (ints
    >= 1), the head and the target."""
    budget, budgets = selection["budget"], selection["budgets"]
    if type(budget) is not int or budget < 0:
        raise ArtifactError(f"{path}: 'budget' must be an integer >= 0 (blocks skipped per row), got {budget!r}: {fix}")
    if not isinstance(budgets, list) or not budgets or not all(type(k) is int and k >= 1 for k in budgets):
        raise ArtifactError(f"{path}: 'budgets' must be a non-empty list of integers >= 1, got {budgets!r}: {fix}")
    if selection["head"] not in HEADS:
        raise ArtifactError(f"{path}: 'head' must be one of {', '.join(HEADS)}, got {selection['head']!r}: {fix}")
    if selection["target"] not in TARGETS:
        raise ArtifactError(f"{path}: 'target' must be one of {', '.join(TARGETS)}, got {selection['target']!r}: {fix}")


def routing_knobs(selection: Mapping | None, **given: Any) -> dict[str, tuple[Any, str]]:
    """Each knob of :data:`ROUTING_KNOBS` as routing uses it, with where its value came from:
    ``given`` (a command's option, None when left out: ``--lam``, ``--budget``) wins, then ``selection`` (the
    routers' ``selection.json``), then the default. ``{"lam": (value, source), "budget": (value, source)}``."""
    knobs = {}
    for knob, default in ROUTING_KNOBS.items():
        if given.get(knob) is not None:
            knobs[knob] = (given[knob], "given on the command line")
        elif selection is not None and knob in selection:
            knobs[knob] = (selection[knob], "chosen by drllm train")
        else:
            why = "no selection.json beside the routers" if selection is None else "selection.json chose none"
            knobs[knob] = (default, f"the default: {why}")
    return knobs


def routers_dev_part(selection: Mapping | None, routers_dir: str | os.PathLike) -> tuple[str, list[str]] | None:
    """``(task, dev ids)`` of the dev part recorded with the routers, None when none was recorded.

    The ids are items of that task's train split, whatever task is then
    evaluated (ARC-Easy routers evaluated on ARC-Challenge calibrate on
    ARC-Easy train items). A record that does not name its task (written by
    an older drllm train) is refused with what to do.
    """
    if selection is None or not selection["dev_ids"]:
        return None
    if not selection.get("task"):
        raise ArtifactError(
            f"{Path(routers_dir) / SELECTION_NAME} does not say which task its dev ids come from (written by an "
            "older drllm train): add \"task\": \"arc_easy\" (the task the routers' paths were searched on) to it, "
            "or train the routers again")
    return selection["task"], list(selection["dev_ids"])
