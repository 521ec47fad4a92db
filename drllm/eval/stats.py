"""Statistics of 0/1 outcomes on the same items: Wilson intervals, McNemar's exact test, seeded aggregates.

Pure arithmetic (no torch), so the report and the command line can use it without loading a model.
"""

from __future__ import annotations

import math
from typing import Sequence

__all__ = ["Z95", "wilson_interval", "mcnemar_exact", "paired_test", "median_test", "seeded_accuracy"]

Z95 = 1.959963984540054


def wilson_interval(correct: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion ``correct / n`` (``(0, 1)`` when ``n == 0``)."""
    if n == 0:
        return 0.0, 1.0
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value: ``b`` and ``c`` discordant pairs, binomial(b + c, 1/2)."""
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2**n
    return min(1.0, 2 * tail)


def paired_test(vanilla: Sequence[int], other: Sequence[int]) -> dict:
    """McNemar's exact test of ``other`` against ``vanilla`` (0/1 correctness on the same items)."""
    b = sum(1 for v, o in zip(vanilla, other) if v and not o)
    c = sum(1 for v, o in zip(vanilla, other) if o and not v)
    return {"only_vanilla": b, "only_method": c, "p": mcnemar_exact(b, c)}


def median_test(tests: Sequence[dict]) -> dict:
    """The test with the median p-value (of an even count, the upper middle one): one seed's test stands for
    several seeds' without pooling their pairs."""
    return sorted(tests, key=lambda t: t["p"])[len(tests) // 2]


def seeded_accuracy(accuracies: Sequence[float], correct: Sequence[int], n: int) -> dict:
    """Several runs of one setting (random seeds), each scored on the same ``n`` items.

    ``accuracy`` is the mean over runs and ``correct`` the mean count,
    ``ci95`` the Wilson interval of all runs' answers pooled, ``spread`` the
    runs' standard deviation (population), minimum and maximum.
    """
    mean = sum(accuracies) / len(accuracies)
    total = sum(correct)
    return {
        "correct": total / len(correct),
        "accuracy": mean,
        "ci95": list(wilson_interval(total, n * len(correct))),
        "spread": {"std": math.sqrt(sum((a - mean) ** 2 for a in accuracies) / len(accuracies)),
                   "min": min(accuracies), "max": max(accuracies)},
    }
