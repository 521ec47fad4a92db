"""What a comparison and a knob selection look like to a reader: tables, verdicts, the frontier plot.

One place for both the command line (``drllm eval``, ``train``, ``demo``) and
the demo's report, so they print the same thing. Nothing here imports torch
at module level (the command line's parser imports it); matplotlib is
imported when a figure is drawn.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from ..integrations.plotting import pyplot, save_figure
from .stats import median_test, paired_test

__all__ = ["format_table", "frontier_table", "frontier_legend", "compute_note", "routers_vs_baselines", "verdict",
           "selection_lines", "frontier_plot", "METHOD_STYLES"]

#: Blocks per pass closer than this are the same compute (the tables print two decimals).
SAME_BLOCKS = 0.005


def format_table(headers: list[str], rows: list[list]) -> str:
    """A GitHub-markdown table, readable in a terminal too."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([line(cells[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, cells[1:])])


def verdict(entry: dict, alpha: float = 0.05) -> str:
    """What the paired test says about ``entry`` against vanilla."""
    if entry["method"] == "vanilla":
        return "-"
    t = entry["mcnemar"]
    if t["p"] >= alpha:
        return "no significant difference"
    return "better than vanilla" if t["only_method"] > t["only_vanilla"] else "worse than vanilla"


def frontier_table(methods: Sequence[dict]) -> tuple[list[str], list[list[str]]]:
    """Headers and rows of the comparison table (for :func:`format_table`)."""
    vanilla = next(m for m in methods if m["method"] == "vanilla")
    rows = []
    for m in methods:
        acc = f"{m['accuracy']:.3f} [{m['ci95'][0]:.3f}, {m['ci95'][1]:.3f}]"
        if "spread" in m:
            acc += f" ±{m['spread']['std']:.3f}"
        t = m["mcnemar"]
        test = "-" if m is vanilla else f"{t['p']:.3g} ({t['only_vanilla']}/{t['only_method']})"
        skipped = m.get("skipped", "-")
        if "runs" in m:
            skipped = f"{len(m['runs'])} {'resamples' if _resampled(m) else 'seeds'}"
        rows.append([m["method"], setting_text(m), acc, f"{m['blocks_per_pass']:.2f}",
                     f"{m['accuracy'] - vanilla['accuracy']:+.3f}", test, verdict(m), str(skipped)])
    headers = ["method", "K / λ", "accuracy [95% CI]", "blocks/pass", "Δ accuracy",
               "McNemar p (only vanilla/only method)", "vs vanilla", "skipped blocks"]
    return headers, rows


def setting_text(entry: dict) -> str:
    """A row's setting as the tables print it: ``-``, a K or a lambda (``0.25``), or ``budget 4``."""
    setting = entry["setting"]
    if setting is None:
        return "-"
    return f"{setting:g}" if isinstance(setting, (int, float)) else str(setting)


def row_name(entry: dict) -> str:
    """How the tables name a row: ``vanilla``, ``routers λ 0``, ``static:2``."""
    if entry["method"] == "vanilla":
        return "vanilla"
    if entry["method"] == "routers" and isinstance(entry["setting"], (int, float)):
        return f"routers λ {entry['setting']:g}"
    if entry["method"].startswith("routers"):  # routers (budget K), routers label-free (budget K)
        return f"{entry['method']} {entry['setting']}"
    return f"{entry['method']}:{entry['setting']}"


def compute_note(blocks: float, other: float) -> str:
    """``equal compute`` only where the measured blocks per pass match; else how many more (or fewer) blocks per
    pass the first runs, so no table says equal compute of rows that are not."""
    if abs(blocks - other) < SAME_BLOCKS:
        return "equal compute"
    return f"{blocks - other:+.2f} blocks/pass"


def _resampled(entry: dict) -> bool:
    """Whether a row's runs are choices made on resamples of the selection items (static, budget routers)."""
    return entry["method"].endswith("-resampled")


def frontier_legend(methods: Sequence[dict]) -> str:
    """What the comparison table's intervals are, and which rows ran at equal compute (same measured blocks per
    pass; rows of one K share it by construction, routers run what they decide)."""
    lines = ["accuracy [95% CI]: Wilson interval over the items; McNemar's exact test against vanilla on the same "
             "items (\"no significant difference\" when p >= 0.05)."]
    for m in methods:
        if "runs" in m:
            what = "seeds"
            if _resampled(m):
                what = ("retrains on resamples of the train and dev parts" if m["method"].startswith("routers")
                        else "resamples of the selection items")
            lines.append(f"{row_name(m)}: mean over {len(m['runs'])} {what} (± their standard deviation); its interval "
                         f"is a {m.get('ci95_method', 'Wilson interval')}; its test is the median run's.")
    groups: dict[float, list[dict]] = {}
    for m in methods:
        key = next((k for k in groups if abs(k - m["blocks_per_pass"]) < SAME_BLOCKS), m["blocks_per_pass"])
        groups.setdefault(key, []).append(m)
    alone = []
    for blocks, members in groups.items():
        if len(members) > 1:
            lines.append(f"equal compute ({blocks:.2f} blocks/pass): {', '.join(row_name(m) for m in members)}.")
        else:
            alone.append(f"{row_name(members[0])} ({blocks:.2f})")
    if alone:
        lines.append(f"no other row at the same blocks/pass: {', '.join(alone)}.")
    return "\n".join("- " + line for line in lines)


def routers_vs_baselines(methods: Sequence[dict], alpha: float = 0.05) -> tuple[list[str], list[list[str]]]:
    """Headers and rows: each router setting against each baseline setting, McNemar's exact test on the same
    items (rows of several runs, random seeds or resamples: every pair of runs, the pair with the median p, as
    against vanilla), and whether the two ran at equal compute (:func:`compute_note`)."""
    routers = [m for m in methods if m["method"].startswith("routers")]  # label-free budget routers too
    others = [m for m in methods if m["method"] != "vanilla" and not m["method"].startswith("routers")]
    rows = []
    for r in routers:
        # budget routers at K meet the baselines dropping the same K blocks (equal compute); lambda routers all
        for m in (o for o in others if r.get("budget") is None or o["setting"] == r["budget"]):
            t = median_test([paired_test([int(c) for c in run["items"]], [int(c) for c in mine["items"]])
                             for run in m.get("runs", [m]) for mine in r.get("runs", [r])])
            if t["p"] >= alpha:
                word = "within noise"
            else:
                word = "routers above" if t["only_method"] > t["only_vanilla"] else "routers below"
            who = setting_text(r) if r["method"] == "routers" else \
                f"{r['method'][len('routers'):].lstrip(' -')} {setting_text(r)}"
            rows.append([who, f"{r['blocks_per_pass']:.2f}", f"{m['method']}:{m['setting']}",
                         f"{m['blocks_per_pass']:.2f}", f"{r['accuracy'] - m['accuracy']:+.3f}",
                         f"{t['p']:.3g} ({t['only_vanilla']}/{t['only_method']})", word,
                         compute_note(r["blocks_per_pass"], m["blocks_per_pass"])])
    headers = ["routers (λ or budget)", "routers blocks/pass", "baseline", "baseline blocks/pass",
               "Δ accuracy (routers - baseline)", "McNemar p (only baseline/only routers)", "routers vs baseline",
               "compute (routers - baseline)"]
    return headers, rows


def selection_lines(selection: dict) -> str:
    """The chosen knobs and the dev figures they were chosen on (:func:`drllm.eval.selection.select_routers`),
    as printed by ``drllm train``, ``drllm eval`` and the demo."""
    head = (f"chosen on {selection['dev']} dev items: min_margin {selection['min_margin']:g}, "
            f"lambda {selection['lam']:g}, epoch {selection['epoch']}")
    if not selection["scored"]:
        return head + " (nothing to choose: one value of each knob)"
    v = selection["dev_vanilla"]
    rows = [["vanilla", "-", "-", f"{v['accuracy']:.3f} [{v['ci95'][0]:.3f}, {v['ci95'][1]:.3f}]", "-"]]
    rows += [[f"min_margin {e['min_margin']:g}", f"{e['lam']:g}", str(e["epoch"]),
              f"{e['accuracy']:.3f} [{e['ci95'][0]:.3f}, {e['ci95'][1]:.3f}]", f"{e['blocks_per_pass']:.2f}"]
             for e in selection["scored"]]
    return head + f" ({selection['rule']})\n" + format_table(
        ["dev candidate", "λ", "epoch", "dev accuracy [95% CI]", "blocks/pass"], rows)


def budget_selection_lines(selection: dict) -> str:
    """The budget routers' dev table (:func:`drllm.eval.budget_selection.select_budget_routers`): each candidate
    head and target at every budget, with the oracle of each head and vanilla, and what was chosen."""
    budgets = [str(k) for k in selection["budgets"]]
    v = selection["dev_vanilla"]
    rows = [["vanilla", "-", f"{v['accuracy']:.3f}"] + ["-"] * len(budgets)]
    for e in selection["scored"]:
        rows.append([f"routers {e['head']}/{e['target']}", f"{e['mean_accuracy']:.3f}", "-"]
                    + [f"{e['budgets'][k]['accuracy']:.3f}" for k in budgets])
    for head, by_k in selection.get("dev_oracle", {}).items():
        rows.append([f"oracle {head}", f"{sum(by_k[k] for k in budgets) / len(budgets):.3f}", "-"]
                    + [f"{by_k[k]:.3f}" for k in budgets])
    head = (f"chosen on {selection['dev']} dev items: head {selection['head']}, target {selection['target']} "
            f"({selection['rule']}); default budget {selection['budget']} (the largest within vanilla's 95% "
            f"interval on dev); label-free: head {selection['label_free']['head']}, target kl")
    return head + "\n" + format_table(["dev", "mean over budgets", "accuracy"] + [f"K={k}" for k in budgets], rows)


# colour, marker, x offset: the baselines of one K share a block count, so each is drawn slightly aside
METHOD_STYLES = {
    "routers": ("#7570b3", "o", 0.0),
    "routers budget": ("#1f78b4", "o", 0.0),  # budget routers: one point per K, drawn as a curve
    "routers label-free": ("#a6cee3", "o", 0.015),  # budget routers trained without gold labels
    "routers-resampled": ("#6a3d9a", "o", -0.015),  # budget routers retrained on resamples: mean and spread
    "shortgpt": ("#d95f02", "s", -0.09),
    "static": ("#1b9e77", "D", -0.03),
    "static-resampled": ("#66c2a5", "d", -0.06),
    "random": ("#777777", "v", 0.03),
    "exit": ("#e7298a", "^", 0.09),
    "oracle": ("#e6ab02", "P", 0.06),
}


def frontier_plot(methods: Sequence[dict], path: str | os.PathLike, title: str = "accuracy vs compute") -> Path:
    """Accuracy (95% interval bars) against blocks per pass, one line per method, vanilla marked.

    ``methods``: the entries of :func:`drllm.eval.compare.compare` (``method``,
    ``setting``, ``accuracy``, ``ci95``, ``blocks_per_pass``), exactly one of
    them ``vanilla``. Large type and the legend outside the axes, so the
    figure reads at report size; baselines at the same K are drawn up to 0.09
    blocks apart so their bars do not hide each other.
    """
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(11, 6.5))
    vanilla = next(m for m in methods if m["method"] == "vanilla")
    ax.axhspan(*vanilla["ci95"], color="k", alpha=0.07, lw=0)
    ax.axhline(vanilla["accuracy"], color="k", ls="--", lw=1)
    _series(ax, [vanilla], "k", "*", 0.0, "vanilla (CI shaded)", markersize=18)
    for method, (color, marker, dx) in METHOD_STYLES.items():
        points = sorted((m for m in methods if _series_name(m) == method), key=lambda m: m["blocks_per_pass"])
        if points:
            _series(ax, points, color, marker, dx, method, markersize=9)
    for m in methods:  # a baseline's K reads off the x axis (L - K blocks); the routers' lambda does not
        if m["method"] == "routers" and m.get("budget") is None:
            # to the left: routers usually sit just below vanilla's block count, where the star is drawn
            ax.annotate(f"λ={m['setting']:g}", (m["blocks_per_pass"], m["accuracy"]), textcoords="offset points",
                        xytext=(-8, 8), ha="right", fontsize=12, color=METHOD_STYLES["routers"][0])
    ax.set_xlabel("blocks per forward pass", fontsize=15)
    ax.set_ylabel("accuracy (95% CI)", fontsize=15)
    ax.set_title(title, fontsize=16)
    ax.tick_params(labelsize=13)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=13, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)
    try:
        return save_figure(fig, path)
    finally:
        plt.close(fig)


def _series_name(entry: dict) -> str:
    """The plotted series of a row: its method, except budget routers (``routers budget``), apart from the
    paper's routers at their lambdas."""
    if entry["method"] == "routers" and entry.get("budget") is not None:
        return "routers budget"
    return entry["method"]


def _series(ax, points: Sequence[dict], color: str, marker: str, dx: float, label: str, markersize: float) -> None:
    ys = [m["accuracy"] for m in points]
    err = [[max(0.0, y - m["ci95"][0]) for y, m in zip(ys, points)],
           [max(0.0, m["ci95"][1] - y) for y, m in zip(ys, points)]]
    ax.errorbar([m["blocks_per_pass"] + dx for m in points], ys, yerr=err, fmt=f"{marker}-", color=color, capsize=4,
                lw=2, markersize=markersize, label=label)
