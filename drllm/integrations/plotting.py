"""Figures of routing decisions and of accuracy against compute (matplotlib, Agg backend, PNG files)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

__all__ = ["decision_heatmap", "decision_histogram", "frontier_plot", "DECISION_COLORS"]

DECISION_COLORS = ("#d95f02", "#7570b3", "#1b9e77")  # skip, execute, repeat
NAMES = ("skip", "execute", "repeat")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _decisions(decisions) -> list[list[int]]:
    rows = [[int(c) for c in d] if isinstance(d, str) else [int(c) for c in d] for d in decisions]
    if not rows or len({len(r) for r in rows}) != 1:
        raise ValueError("decisions must be a non-empty list of equally long paths")
    return rows


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    os.replace(tmp, path)
    return path


def decision_heatmap(decisions: Sequence, path: str | os.PathLike, title: str = "routing decisions") -> Path:
    """Examples (rows) x blocks (columns), coloured skip / execute / repeat. ``decisions``: path strings or lists."""
    plt = _pyplot()
    from matplotlib.colors import BoundaryNorm, ListedColormap
    from matplotlib.patches import Patch

    rows = _decisions(decisions)
    n, L = len(rows), len(rows[0])
    fig, ax = plt.subplots(figsize=(max(4.0, 0.25 * L + 2), max(2.5, min(12.0, 0.06 * n + 1.5))))
    cmap = ListedColormap(DECISION_COLORS)
    ax.imshow(rows, aspect="auto", interpolation="nearest", cmap=cmap, norm=BoundaryNorm([-0.5, 0.5, 1.5, 2.5], 3))
    ax.set_xlabel("block")
    ax.set_ylabel("example")
    ax.set_title(title)
    ax.legend(handles=[Patch(color=c, label=name) for c, name in zip(DECISION_COLORS, NAMES)],
              loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    try:
        return _save(fig, path)
    finally:
        plt.close(fig)


def decision_histogram(decisions: Sequence, path: str | os.PathLike, title: str = "decisions per block") -> Path:
    """Per block, the share of examples that skip / execute / repeat it (stacked bars), and path lengths."""
    plt = _pyplot()
    rows = _decisions(decisions)
    n, L = len(rows), len(rows[0])
    counts = [[sum(1 for r in rows if r[i] == c) for i in range(L)] for c in range(3)]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(max(6.0, 0.25 * L + 5), 3.2), gridspec_kw={"width_ratios": [3, 1]})
    bottom = [0.0] * L
    for c in range(3):
        share = [counts[c][i] / n for i in range(L)]
        ax.bar(range(L), share, bottom=bottom, color=DECISION_COLORS[c], label=f"{NAMES[c]} ({sum(counts[c])})")
        bottom = [b + s for b, s in zip(bottom, share)]
    ax.set_xlabel("block")
    ax.set_ylabel("share of examples")
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.legend(fontsize=8, loc="lower left")
    lengths = [sum(r) for r in rows]
    ax2.hist(lengths, bins=range(min(lengths), max(lengths) + 2), color="#666666", align="left")
    ax2.axvline(L, color="k", ls="--", lw=1)
    ax2.set_xlabel("path length")
    ax2.set_ylabel("examples")
    try:
        return _save(fig, path)
    finally:
        plt.close(fig)


# colour, marker, x offset: the baselines of one K share a block count, so each is drawn slightly aside
METHOD_STYLES = {
    "routers": ("#7570b3", "o", 0.0),
    "shortgpt": ("#d95f02", "s", -0.09),
    "static": ("#1b9e77", "D", -0.03),
    "random": ("#777777", "v", 0.03),
    "exit": ("#e7298a", "^", 0.09),
}


def frontier_plot(methods: Sequence[dict], path: str | os.PathLike, title: str = "accuracy vs compute") -> Path:
    """Accuracy (95% interval bars) against blocks per pass, one line per method, vanilla marked.

    ``methods``: the entries of :func:`drllm.evaluate.compare` (``method``,
    ``setting``, ``accuracy``, ``ci95``, ``blocks_per_pass``), exactly one of
    them ``vanilla``. Large type and the legend outside the axes, so the
    figure reads at report size; baselines at the same K are drawn up to 0.09
    blocks apart so their bars do not hide each other.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(11, 6.5))
    vanilla = next(m for m in methods if m["method"] == "vanilla")
    ax.axhspan(*vanilla["ci95"], color="k", alpha=0.07, lw=0)
    ax.axhline(vanilla["accuracy"], color="k", ls="--", lw=1)
    _series(ax, [vanilla], "k", "*", 0.0, "vanilla (CI shaded)", markersize=18)
    for method, (color, marker, dx) in METHOD_STYLES.items():
        points = sorted((m for m in methods if m["method"] == method), key=lambda m: m["blocks_per_pass"])
        if points:
            _series(ax, points, color, marker, dx, method, markersize=9)
    for m in methods:  # a baseline's K reads off the x axis (L - K blocks); the routers' lambda does not
        if m["method"] == "routers":
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
        return _save(fig, path)
    finally:
        plt.close(fig)


def _series(ax, points: Sequence[dict], color: str, marker: str, dx: float, label: str, markersize: float) -> None:
    ys = [m["accuracy"] for m in points]
    err = [[max(0.0, y - m["ci95"][0]) for y, m in zip(ys, points)],
           [max(0.0, m["ci95"][1] - y) for y, m in zip(ys, points)]]
    ax.errorbar([m["blocks_per_pass"] + dx for m in points], ys, yerr=err, fmt=f"{marker}-", color=color, capsize=4,
                lw=2, markersize=markersize, label=label)
