"""``drllm demo``: search, train and evaluate routers for the embedded model on ARC-Easy.

A newcomer's first run: the frozen model gets routers from paths found by
the search on train items, and is compared with itself on validation items.
Every stage writes its results to ``out_dir`` and resumes from them.
The settings are importable without torch (``drllm demo --help`` shows them);
the pipeline imports it when it runs.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .commands.common import format_table, write_json_atomic
from .commands.train import selection_lines
from .models import DEFAULT_MODEL

TASK = "arc_easy"


@dataclass(frozen=True)
class DemoSettings:
    """Sizes of each stage; ``n_eval=None`` evaluates the whole validation split.
    ``min_margin``: how decisively a searched path must win to be learned
    (:func:`drllm.train.label_path`), and ``lam`` the control knob; None
    chooses each from its grid on the dev part of the searched items
    (:func:`drllm.train.select_routers`), a value fixes it. ``probe_skips``:
    also probe every single-block skip on the searched items, so items
    without a decisive path teach the skip the train part shares
    (:func:`drllm.train.train_shared_skip`)."""

    n_search: int
    simulations: int
    n_eval: int | None
    epochs: int = 25
    seed: int = 0
    min_margin: float | None = None  # None: chosen on the dev part
    lam: float | None = None  # None: chosen on the dev part
    probe_skips: bool = False


# Default: about 14 minutes on a quiet 2-core CPU (search ~0.9 s per item,
# scoring ~0.3 s per item and model); quick: 1 to 2 minutes (CI runs it).
DEFAULT = DemoSettings(n_search=500, simulations=32, n_eval=None)
QUICK = DemoSettings(n_search=8, simulations=8, n_eval=24)


def _cell(summary: dict) -> str:
    lo, hi = summary["ci95"]
    return f"{summary['accuracy']:.3f} [{lo:.3f}, {hi:.3f}]"


def results_table(result: dict) -> str:
    """Accuracy, path length and layers of vanilla vs routed, as a markdown table."""
    L = result["num_blocks"]
    v, r = result["vanilla"], result["routed"]
    saved_pass = L - r["mean_path_length"]
    saved_example = v["layers_per_example"] - r["layers_per_example"]
    return format_table(
        ["model", "accuracy [95% CI]", "blocks per pass", "layers per example", "layers saved per example"],
        [
            ["vanilla", _cell(v), f"{v['mean_path_length']:.2f} / {L}", f"{v['layers_per_example']:.1f}", "-"],
            ["routed", _cell(r), f"{r['mean_path_length']:.2f} / {L}", f"{r['layers_per_example']:.1f}",
             f"{saved_example:.1f} ({saved_pass:.2f} per pass)"],
        ],
    )


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

    from .evaluate import evaluate
    from .integrations.plotting import decision_heatmap, decision_histogram
    from .models import load_model
    from .routers import Routers
    from .search import SearchConfig, block_gains, probe_skips, run_search
    from .tasks import load_task
    from .train import LAMS, MARGINS, TrainConfig, select_routers

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(stage: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        seconds[stage] = round(now - clock, 2)
        clock = now

    train_items = load_task(TASK, "train", data_dir=data_dir, limit=settings.n_search)
    val_items = load_task(TASK, "validation", data_dir=data_dir, limit=settings.n_eval)
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

    with torch.no_grad():
        result = evaluate(model, tokenizer, Routers.from_pretrained(out / "routers"), val_items, reward="loglik",
                          lam=selection["lam"])
    lap("eval")

    figures = [
        decision_heatmap(result["decisions"], out / "heatmap.png", title="ARC-Easy validation: routed decisions"),
        decision_histogram(result["decisions"], out / "histogram.png", title="decisions per block"),
    ]
    summary = {
        "task": TASK,
        "model": model_name or DEFAULT_MODEL,
        "settings": asdict(settings),
        "search": search,
        "train": {k: training[k] for k in ("final", "records", "default_labels", "shared_skip", "shared_labels",
                                           "thin_labels", "class_counts", "class_weights", "train", "dev",
                                           "train_seconds")},
        "selection": selection,
        "vanilla": result["vanilla"],
        "routed": result["routed"],
        "difference": result["difference"],
        "num_blocks": result["num_blocks"],
        "n_eval": result["n"],
        "seconds": seconds,
        "routers": "routers",  # paths relative to out_dir: the report and summary hold no machine paths
        "figures": [Path(f).name for f in figures],
    }
    _write_report(out / "report.md", summary, result)
    write_json_atomic(out / "summary.json", summary)
    return {**summary, "table": results_table(result)}


def _shared_line(train: dict) -> str:
    if train["shared_skip"] is None:
        return "No single-block skip was probed, or every one lost more items of the train part than it gained."
    return (f"Single-block skip probe: block {train['shared_skip']} is the skip the train part's items share; "
            f"{train['shared_labels']} items teach it.")


def _write_report(path: Path, summary: dict, result: dict) -> None:
    s, t, c, d = summary["search"], summary["train"], summary["selection"], summary["difference"]
    stages = format_table(["stage", "seconds"], [[k, f"{v:.1f}"] for k, v in summary["seconds"].items()])
    unset = {"n_eval": "all", "min_margin": "chosen on dev", "lam": "chosen on dev"}
    settings = format_table(["setting", "value"], [[k, unset.get(k, v) if v is None else v]
                                                   for k, v in summary["settings"].items()])
    text = f"""# drllm demo report

Model: `{summary['model']}` ({summary['num_blocks']} blocks). Task: ARC-Easy, log-likelihood (acc_norm) scoring.

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

## Vanilla vs routed ({summary['n_eval']} validation items, λ {c['lam']:g})

{results_table(result)}

Routed minus vanilla: accuracy {d['accuracy']:+.3f}; both correct {d['both_correct']}, only vanilla
{d['only_vanilla']}, only routed {d['only_routed']}, neither {d['neither']}.

![decisions](heatmap.png)

## Time per stage

{stages}
"""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(path)
