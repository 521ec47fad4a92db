"""``drllm demo``: search, train and evaluate routers for the embedded model on ARC-Easy.

A newcomer's first run: the frozen model gets the paper's routers from paths
found by the search on ARC-Easy train items (knobs chosen on their dev part),
and budget routers from the damage of skips measured on the same items (head
and target chosen on the same dev part, :func:`drllm.eval.budget_selection.select_budget_routers`).
Both are compared with the model itself, with the oracle of the budget
routers' kind and with the static baselines of :mod:`drllm.eval.baselines` at
the same numbers of skipped blocks (static selection also on resamples of
the dev part, to show its spread) on ARC-Easy validation and, out of domain,
ARC-Challenge validation (:func:`drllm.eval.compare.compare`). Validation is
read once, after every choice was made. Every stage writes its results to
``out_dir``; search, training and damage measurement resume from them.
The settings are importable without torch (``drllm demo --help`` shows them);
the pipeline imports it when it runs. Library code: it imports no command;
``drllm demo`` prints what it returns.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .artifacts import write_json
from .eval.report import (budget_selection_lines, format_table, frontier_legend, frontier_plot, frontier_table,
                          routers_vs_baselines, selection_lines)
from .models import DEFAULT_MODEL

TASK = "arc_easy"
#: Evaluated splits: in domain, then out of domain (routers trained on ARC-Easy only).
DATASETS = (("arc_easy", "ARC-Easy validation"), ("arc_challenge", "ARC-Challenge validation (out of domain)"))
BASELINES = ("shortgpt", "static", "random", "exit")
#: Where the budget routers go, under the demo's folder (the label-free ones in its ``label-free/``).
BUDGET_ROUTERS = "budget-routers"


@dataclass(frozen=True)
class DemoSettings:
    """Sizes of each stage; ``n_eval=None`` evaluates the whole validation splits.
    ``min_margin``: how decisively a searched path must win to be learned
    (:func:`drllm.train.label_path`), and ``lam`` the control knob; None
    chooses each from its grid on the dev part of the searched items
    (:func:`drllm.eval.selection.select_routers`), a value fixes it. ``probe_skips``:
    also probe every single-block skip on the searched items, so items
    without a decisive path teach the skip the train part shares
    (:func:`drllm.train.train_shared_skip`). ``ks``: blocks each baseline
    drops beside the paper's routers; ``seeds``: random skip sets per K.
    ``budgets``: blocks the budget routers skip per row (the baselines drop
    them too); ``budget_items``: the ARC-Easy train items the budget routers
    learn from (their damage needs no search; None: the searched items),
    whose dev part also selects the baselines; ``vocabulary_size`` and ``vocabulary_items``: the head
    ``sets``' skip sets per budget and the train items they are chosen on
    (:class:`~drllm.eval.budget_selection.BudgetSettings`); ``resamples``:
    bootstrap resamples of the dev part static selection is repeated on;
    ``shortlist``: single skips greedy static selection keeps after its first
    step (None: every block at every step)."""

    n_search: int
    simulations: int
    n_eval: int | None
    epochs: int = 25
    seed: int = 0
    min_margin: float | None = None  # None: chosen on the dev part
    lam: float | None = None  # None: chosen on the dev part
    probe_skips: bool = False
    ks: tuple[int, ...] = (1, 2, 4)
    seeds: int = 5
    budgets: tuple[int, ...] = (1, 2, 4, 6, 8)
    budget_items: int | None = None  # None: the searched items
    vocabulary_size: int = 3
    vocabulary_items: int = 80
    resamples: int = 3
    shortlist: int | None = 12


# Default: cut to fit 45 minutes on a 2-core CPU (README says what is cut and what
# `drllm train --budget` / `drllm eval` run on the full splits): 100 searched items (their dev
# part, 20 items, chooses the knobs and the baselines' sets), the vocabulary chosen on 40 of
# them, 100 items of each validation split, random over 2 seeds. Quick: about two minutes.
DEFAULT = DemoSettings(n_search=100, simulations=32, n_eval=100, seeds=2, vocabulary_items=40)
QUICK = DemoSettings(n_search=8, simulations=8, n_eval=12, ks=(1,), seeds=2, budgets=(1, 2), vocabulary_size=2,
                     vocabulary_items=4)


def run_demo(
    out_dir: str | Path,
    settings: DemoSettings = DEFAULT,
    *,
    model_name: str | None = None,
    data_dir: str | None = None,
    device: str | None = None,
    progress: bool = True,
) -> dict:
    """Run the pipeline and return its figures (also written to ``out_dir/summary.json``)."""
    import torch

    from .eval.baselines import calibration_set
    from .eval.budget_selection import LABEL_FREE, RESAMPLED, BudgetSettings, saved_companions, select_budget_routers
    from .eval.compare import choose_baselines, compare
    from .eval.selection import LAMS, MARGINS, select_routers
    from .integrations.plotting import decision_heatmap, decision_histogram
    from .models import load_model
    from .routing.budget import BudgetRouters
    from .routing.routers import Routers
    from .search import SearchConfig, block_gains, probe_skips, run_search
    from .tasks import load_task
    from .train import TrainConfig

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(stage: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        seconds[stage] = round(now - clock, 2)
        clock = now

    budget_items = settings.budget_items or settings.n_search
    items = load_task(TASK, "train", data_dir=data_dir, limit=max(settings.n_search, budget_items))
    train_items, budget_train = items[: settings.n_search], items[:budget_items]
    evaluated = {task: load_task(task, "validation", data_dir=data_dir, limit=settings.n_eval)
                 for task, _ in DATASETS}
    model, tokenizer = load_model(model_name, device=device)
    lap("load")

    search_config = SearchConfig(simulations=settings.simulations, seed=settings.seed)
    search = run_search(model, tokenizer, train_items, out / "paths.jsonl", config=search_config, reward="loglik",
                        progress=progress)
    lap("search")
    skips_file = None
    if settings.probe_skips:
        skips_file = out / "skips.jsonl"
        search["block_gains"] = block_gains(probe_skips(model, tokenizer, train_items, skips_file,
                                                        config=search_config, progress=progress))
        lap("skip probe")

    # the knobs are chosen on the dev part of the searched train items; validation is read once, below
    selection = select_routers(
        model, tokenizer, out / "paths.jsonl", out / "routers",
        config=TrainConfig(epochs=settings.epochs, seed=settings.seed, progress=progress, device=str(model.device)),
        margins=MARGINS if settings.min_margin is None else [settings.min_margin],
        lams=LAMS if settings.lam is None else [settings.lam],
        skips_file=skips_file, examples={e.id: e for e in train_items},
    )
    training = selection.pop("run")
    lap("train")

    # budget routers on the searched items (or budget_items), head and target chosen on their dev part (as drllm
    # train --budget does)
    budget_settings = BudgetSettings(vocabulary_size=settings.vocabulary_size,
                                     vocabulary_items=settings.vocabulary_items, seed=settings.seed,
                                     resamples=settings.resamples)
    budgets = _servable(BudgetRouters.for_model(model, tap=budget_settings.tap), settings.budgets,
                        budget_settings.allowed)
    budget_selection = select_budget_routers(
        model, tokenizer, budget_train, out / BUDGET_ROUTERS, progress=progress,
        settings=BudgetSettings(**{**asdict(budget_settings), "budgets": budgets}), log=print if progress else _quiet)
    lap("budget routers")

    # shortgpt's calibration and static's selection: the dev part recorded with the budget routers (train split;
    # the paper's routers' dev part too when both split the same items the same way)
    calibration, source = calibration_set(TASK, [e for items in evaluated.values() for e in items], n=0,
                                          dev_ids=budget_selection["dev_ids"], train=budget_train)
    routers = Routers.from_pretrained(out / "routers")
    budget_routers = BudgetRouters.from_pretrained(out / BUDGET_ROUTERS)
    label_free, resampled = saved_companions(out / BUDGET_ROUTERS, budget_selection)
    # every baseline at the paper's Ks and at the budgets (a small model cannot drop K >= L blocks)
    ks = sorted({k for k in (*settings.ks, *budgets) if k < routers.num_blocks})
    with torch.no_grad():
        skip_sets = choose_baselines(model, tokenizer, [(m, ks) for m in BASELINES], calibration=calibration,
                                     seeds=settings.seeds, shortlist=settings.shortlist, resamples=settings.resamples)
        lap("baselines")
        datasets, reports = {}, {}
        for task, title in DATASETS:  # each split's table is written as soon as it is scored
            # the paper's routers beside vanilla only; the budget routers, their oracle and every baseline in one
            # pass of forced paths; one table of both (the same vanilla rows: forced all-ones paths)
            paper = compare(model, tokenizer, evaluated[task], routers=routers, lams=[selection["lam"]],
                            skip_sets=({}, {}), progress=progress)
            budget = compare(model, tokenizer, evaluated[task], routers=budget_routers, budgets=budgets,
                             label_free=label_free, resampled=resampled, skip_sets=skip_sets, progress=progress)
            datasets[task] = {**paper, "methods": _merged(paper["methods"], budget["methods"]),
                              "budget_sweep": budget["sweep"], "baselines": budget["baselines"]}
            reports[task] = _dataset_report(out, task, title, datasets[task]["methods"])
            lap(f"eval {task}")
    routed = datasets[TASK]["sweep"][0]
    figures = [Path(f).name for f in (
        decision_heatmap(routed["decisions"], out / "heatmap.png", title="ARC-Easy validation: routed decisions"),
        decision_histogram(routed["decisions"], out / "histogram.png", title="decisions per block"),
    )]
    figures += [r["figure"] for r in reports.values()]
    summary = {
        "task": TASK,
        "model": model_name or DEFAULT_MODEL,
        "settings": asdict(settings),
        "search": search,
        "train": {k: training[k] for k in ("final", "records", "default_labels", "shared_skip", "shared_labels",
                                           "thin_labels", "class_counts", "class_weights", "train", "dev",
                                           "train_seconds")},
        "selection": selection,
        "budget": {"selection": budget_selection, "budgets": list(budgets), "routers": BUDGET_ROUTERS,
                   "label_free": f"{BUDGET_ROUTERS}/{LABEL_FREE}", "resampled": f"{BUDGET_ROUTERS}/{RESAMPLED}"},
        "calibration": source,
        "baselines": skip_sets[1],
        "datasets": {task: {"title": title, "n": len(evaluated[task]), "methods": datasets[task]["methods"],
                            "figure": reports[task]["figure"]} for task, title in DATASETS},
        "vanilla": routed["vanilla"],
        "routed": routed["routed"],
        "difference": routed["difference"],
        "num_blocks": routed["num_blocks"],
        "n_eval": routed["n"],
        "seconds": seconds,
        "routers": "routers",  # paths relative to out_dir: the report and summary hold no machine paths
        "figures": figures,
    }
    _write_report(out / "report.md", summary, reports)
    write_json(out / "summary.json", summary)
    return {**summary, "tables": {task: r["tables"] for task, r in reports.items()}}


def _quiet(line: str) -> None:
    """A log that prints nothing (``progress=False``)."""


def _servable(routers, budgets: tuple[int, ...], allowed: int) -> tuple[int, ...]:
    """The budgets budget routers of this model can be built for: at most ``allowed`` skips (the vocabulary's
    blocks) and what the blocks from the tap on allow (a small model serves fewer)."""
    return tuple(k for k in budgets if k <= min(allowed, routers.most_skips()))


def _merged(paper: list[dict], budget: list[dict]) -> list[dict]:
    """One comparison of both kinds of routers: vanilla, the paper's routers, then the budget routers' rows and
    the baselines. Both were scored on the same items with the same forced all-ones path for vanilla."""
    if paper[0]["items"] != budget[0]["items"]:
        raise RuntimeError("vanilla differs between two scorings of the same items: the model is not deterministic")
    return [budget[0], *paper[1:], *budget[1:]]


def _dataset_report(out: Path, task: str, title: str, methods: list[dict]) -> dict:
    """One evaluated split: the comparison table with its legend, routers against each baseline, the frontier
    plot."""
    n = methods[0]["n"]
    tables = (format_table(*frontier_table(methods)) + "\n\n" + frontier_legend(methods),
              format_table(*routers_vs_baselines(methods)))
    figure = frontier_plot(methods, out / f"frontier-{task}.png", title=f"{title}: accuracy vs compute (n={n})")
    (out / f"frontier-{task}.md").write_text(tables[0] + "\n\n" + tables[1] + "\n")
    write_json(out / f"methods-{task}.json", methods)
    return {"tables": tables, "figure": Path(figure).name}


def _shared_line(train: dict) -> str:
    if train["shared_skip"] is None:
        return "No single-block skip was probed, or every one lost more items of the train part than it gained."
    return (f"Single-block skip probe: block {train['shared_skip']} is the skip the train part's items share; "
            f"{train['shared_labels']} items teach it.")


def _write_report(path: Path, summary: dict, reports: dict) -> None:
    s, t, c = summary["search"], summary["train"], summary["selection"]
    stages = format_table(["stage", "seconds"], [[k, f"{v:.1f}"] for k, v in summary["seconds"].items()])
    unset = {"n_eval": "all", "min_margin": "chosen on dev", "lam": "chosen on dev",
             "shortlist": "every block at every step"}
    settings = format_table(["setting", "value"], [[k, unset.get(k, v) if v is None else v]
                                                   for k, v in summary["settings"].items()])
    b = summary["budget"]
    evaluations = "\n".join(_evaluation_section(summary["datasets"][task], reports[task]["tables"], c["lam"],
                                                b["budgets"]) for task in reports)
    budget = b["selection"]
    vocabulary = "; ".join(f"K={k}: {v}" for k, v in budget["vocabulary"].items())
    text = f"""# drllm demo report

Model: `{summary['model']}` ({summary['num_blocks']} blocks). Trained on ARC-Easy train items; evaluated on
ARC-Easy validation and ARC-Challenge validation, log-likelihood (acc_norm) scoring.

{settings}

## Path search ({s['n']} train items)

Default-path accuracy {s['default_accuracy']:.3f}, best-path accuracy {s['best_accuracy']:.3f},
mean layers saved per pass by the best path {s['mean_layers_saved']:.2f}, improved {s['improved_fraction']:.2f},
{s['evaluations_per_second']:.2f} path evaluations per second.

## Router training

{t['records']} searched items: {t['train']} train, {t['dev']} dev (seed {c['seed']}). A path is learned only if
the gold answer wins by a margin of at least {c['min_margin']:g} (normalised log-likelihood):
{t['default_labels']} items teach the default path. A skip or repeat taught at a block by fewer than
{c['min_block_labels']} train items is taught as execute ({t['thin_labels']} block decisions).
{_shared_line(t)}

## Knobs chosen on the dev part

```
{selection_lines(c)}
```

## Budget routers

One router reads the prompt once, at block {budget['tap']}, and picks the K blocks each row skips: every row runs
exactly L - K blocks. Trained on the damage of skips measured on the searched items ({budget['train']} train,
{budget['dev']} dev, seed {budget['seed']}): every single skip from block {budget['tap']} on (head `blocks`), and a
vocabulary of skip sets per K chosen greedily on the first {budget['settings']['vocabulary_items']} train items
among the blocks {budget['allowed']} (head `sets`: {vocabulary}). Each head is trained on the gold answer's margin
drop and, label-free, on the KL to the full model's answer distribution; the dev part chose:

```
{budget_selection_lines(budget)}
```

Baselines (ShortGPT calibration, static selection): {summary['calibration']}; static selection repeated on
{summary['settings']['resamples']} bootstrap resamples of it (`static-resampled`: mean and spread), and the budget
routers retrained on as many resamples of their train and dev parts, the dev draws the same
(`routers-resampled`: mean and spread).
{evaluations}
![decisions](heatmap.png)

## Time per stage

{stages}
"""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _evaluation_section(dataset: dict, tables: tuple[str, str], lam: float, budgets) -> str:
    return f"""
## {dataset['title']}: {dataset['n']} items, routers at λ {lam:g}, budget routers at K = {', '.join(map(str, budgets))}

{tables[0]}

Routers against each baseline, same items (McNemar; random: its median seed; budget routers only against the
baselines dropping the same K blocks, at equal compute):

{tables[1]}

![frontier]({dataset['figure']})
"""
