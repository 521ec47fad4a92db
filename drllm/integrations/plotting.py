"""Figures of routing decisions and of a lambda sweep (matplotlib, Agg backend, PNG files)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

__all__ = ["decision_heatmap", "decision_histogram", "sweep_plot", "DECISION_COLORS"]

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


def sweep_plot(points: Sequence[dict], vanilla: dict, path: str | os.PathLike, title: str = "lambda sweep") -> Path:
    """Accuracy (with its 95% interval) against layers per example, one point per lambda, and vanilla.

    ``points``: dicts with ``lam``, ``accuracy``, ``ci95`` and ``layers_per_example``; ``vanilla`` the same
    without ``lam``.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    pts = sorted(points, key=lambda p: p["layers_per_example"])
    xs = [p["layers_per_example"] for p in pts]
    ys = [p["accuracy"] for p in pts]
    err = [[max(0.0, y - p["ci95"][0]) for y, p in zip(ys, pts)], [max(0.0, p["ci95"][1] - y) for y, p in zip(ys, pts)]]
    ax.errorbar(xs, ys, yerr=err, fmt="o-", capsize=3, color=DECISION_COLORS[1], label="routed")
    for x, y, p in zip(xs, ys, pts):
        ax.annotate(f"λ={p['lam']:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    v = vanilla
    ax.errorbar([v["layers_per_example"]], [v["accuracy"]],
                yerr=[[max(0.0, v["accuracy"] - v["ci95"][0])], [max(0.0, v["ci95"][1] - v["accuracy"])]],
                fmt="s", capsize=3, color="k", label="vanilla")
    ax.set_xlabel("layers per example (block applications)")
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    ax.legend(fontsize=8)
    try:
        return _save(fig, path)
    finally:
        plt.close(fig)
