"""Statistics of 0/1 outcomes on the same items: Wilson intervals, McNemar's exact test, seeded aggregates.

Pure arithmetic (no torch), so the report and the command line can use it without loading a model.
"""

from __future__ import annotations

import math
import random
from typing import Sequence

__all__ = ["Z95", "BOOTSTRAP_RESAMPLES", "BOOTSTRAP_SEED", "SEEDED_INTERVAL", "wilson_interval", "mcnemar_exact",
           "paired_test", "median_test", "bootstrap_mean_interval", "seeded_accuracy"]

Z95 = 1.959963984540054
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0
#: What :func:`seeded_accuracy`'s ``ci95`` is, in the words a table's legend uses.
SEEDED_INTERVAL = (f"bootstrap over items ({BOOTSTRAP_RESAMPLES} resamples, seed {BOOTSTRAP_SEED}) "
                   "of the mean accuracy across runs")


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


def bootstrap_mean_interval(outcomes: Sequence[Sequence[int]], *, resamples: int = BOOTSTRAP_RESAMPLES,
                            seed: int = BOOTSTRAP_SEED, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap over items of the mean accuracy of several runs scored on the same items.

    Why items, not answers: runs on the same items share the items' luck, so
    pooling their answers as if each were a new item narrows the interval
    with every run added (three identical runs would look three times as
    sure). Resample ``r`` draws ``n`` item indices with replacement
    (``random.Random(seed).choices``, one generator for all resamples) and
    takes the runs' mean accuracy on them. ``(0, 1)`` when there are no items.
    """
    if not outcomes:
        raise ValueError("no runs to take an interval of")
    n = len(outcomes[0])
    if any(len(o) != n for o in outcomes):
        raise ValueError("every run must be scored on the same items")
    if n == 0:
        return 0.0, 1.0
    per_item = [sum(int(o[i]) for o in outcomes) for i in range(n)]  # correct runs per item: exact integers
    rng = random.Random(seed)
    items = range(n)
    totals = sorted(sum(per_item[i] for i in rng.choices(items, k=n)) for _ in range(resamples))
    cut = round((1 - level) / 2 * resamples)  # resamples left out below the interval, and above it
    lo, hi = totals[cut], totals[resamples - 1 - cut]
    return lo / (n * len(outcomes)), hi / (n * len(outcomes))


def seeded_accuracy(outcomes: Sequence[Sequence[int]]) -> dict:
    """Several runs of one setting (random seeds), each scored on the same items (``outcomes``: one 0/1 list
    per run).

    ``accuracy`` is the mean over runs and ``correct`` the mean count,
    ``ci95`` the bootstrap over items of that mean (:func:`bootstrap_mean_interval`,
    :data:`SEEDED_INTERVAL`), ``spread`` the runs' standard deviation
    (population), minimum and maximum.
    """
    n = len(outcomes[0])
    correct = [sum(int(c) for c in o) for o in outcomes]
    accuracies = [c / n for c in correct]
    mean = sum(correct) / (n * len(correct))  # exact: the same for the same runs in any order
    return {
        "correct": sum(correct) / len(correct),
        "accuracy": mean,
        "ci95": list(bootstrap_mean_interval(outcomes)),
        "ci95_method": SEEDED_INTERVAL,
        "spread": {"std": math.sqrt(sum((a - mean) ** 2 for a in accuracies) / len(accuracies)),
                   "min": min(accuracies), "max": max(accuracies)},
    }
