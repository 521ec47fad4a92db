"""Figures of routing decisions (matplotlib, Agg backend, PNG files), and the two helpers every figure uses.

The accuracy-vs-compute figure of a comparison lives with its tables (:func:`drllm.eval.report.frontier_plot`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

__all__ = ["decision_heatmap", "decision_histogram", "pyplot", "save_figure", "DECISION_COLORS"]

DECISION_COLORS = ("#d95f02", "#7570b3", "#1b9e77")  # skip, execute, repeat
NAMES = ("skip", "execute", "repeat")


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend (files only, no display), imported on first use."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _decisions(decisions) -> list[list[int]]:
    rows = [[int(c) for c in d] if isinstance(d, str) else [int(c) for c in d] for d in decisions]
    if not rows or len({len(r) for r in rows}) != 1:
        raise ValueError("decisions must be a non-empty list of equally long paths")
    return rows


def save_figure(fig, path) -> Path:
    """Write ``fig`` to ``path`` atomically (a temporary file, then a rename), creating its folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    os.replace(tmp, path)
    return path


def decision_heatmap(decisions: Sequence, path: str | os.PathLike, title: str = "routing decisions") -> Path:
    """Examples (rows) x blocks (columns), coloured skip / execute / repeat. ``decisions``: path strings or lists."""
    plt = pyplot()
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
        return save_figure(fig, path)
    finally:
        plt.close(fig)


def decision_histogram(decisions: Sequence, path: str | os.PathLike, title: str = "decisions per block") -> Path:
    """Per block, the share of examples that skip / execute / repeat it (stacked bars), and path lengths."""
    plt = pyplot()
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
        return save_figure(fig, path)
    finally:
        plt.close(fig)
