"""Timing shared by every suite: variants interleaved and medians taken, so a loaded machine slows them all alike.

CUDA is synchronised around every timing.
"""

from __future__ import annotations

import contextlib
import statistics
import time

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> float:
    """Seconds taken by ``fn()``, the device synchronised before and after."""
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def interleaved(variants: dict, repeats: int, device: torch.device, warmup: bool = True) -> dict:
    """Median seconds of each variant, timed in turn ``repeats`` times.

    ``variants`` maps a name to a ``setup()`` returning ``(run, teardown)``:
    only ``run()`` is timed. One untimed warm-up round runs first.
    """
    samples = {name: [] for name in variants}
    for r in range(repeats + (1 if warmup else 0)):
        for name, setup in variants.items():
            run, teardown = setup()
            try:
                seconds = timed(run, device)
            finally:
                teardown()
            if r or not warmup:
                samples[name].append(seconds)
    return {name: {"median": statistics.median(s), "all": s} for name, s in samples.items()}


def variant(fn, ctx_factory=None):
    """A setup for :func:`interleaved`: enter ``ctx_factory()``, time ``fn``, exit."""

    def setup():
        ctx = ctx_factory() if ctx_factory is not None else contextlib.nullcontext()
        ctx.__enter__()
        return fn, lambda: ctx.__exit__(None, None, None)

    return setup


def self_noise(res: dict) -> float:
    """The run's noise: the largest relative gap between the vanilla model and itself over interleaved repeats."""
    return max(abs(a / b - 1) for a, b in zip(res["vanilla (again)"]["all"], res["vanilla"]["all"]))
