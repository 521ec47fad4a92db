"""Static skip sets that routers are measured against.

Each baseline drops K blocks for every input, so it runs L - K blocks per
pass (a forced path, run through the same executor as the routers); routers
run as many as they decide, so a comparison is at equal compute only where
the measured blocks per pass match (:func:`drllm.eval.report.compute_note`):

- ``shortgpt``: ShortGPT (Men et al., 2024). Block Influence of block i is
  ``1 - mean cos(x_i, x_{i+1})`` over the real tokens of calibration prompts,
  ``x_i`` the hidden state entering block i (``x_L``: the last block's output,
  before the final norm); the K least influential blocks are dropped.
- ``static``: the K-block skip set chosen greedily by accuracy on a selection
  set (each step adds the block whose skip scores best with those chosen).
- ``random``: K random blocks, one set per seed.
- ``exit``: early exit without retraining: the last K blocks are dropped, so
  the first L - K blocks feed the final norm and the LM head.

``random`` and ``static`` stay inside the search's space (no more than
``max_skip_run`` consecutive skips); ``shortgpt`` and ``exit`` are the
published rules and ignore it. Calibration and selection items must never
be the evaluated ones (:func:`check_disjoint`); which items they are is the
caller's to say (:func:`calibration_set` takes the dev ids recorded with the
routers, it reads no file).
"""

from __future__ import annotations

import os
import random
from typing import Any, Callable, Sequence

import torch

from ..paths import skip_set_path
from ..runtime.adapters import decoder, describe
from ..runtime.control import block_states
from ..search.mcts import skip_run_ok
from ..tasks import (Example, cloze_requests, encode_prompt, encode_request, generation_prompt, load_task,
                     use_chat_template)
from .scoring import evaluate_path, score_paths

__all__ = [
    "BASELINES",
    "BaselineError",
    "parse_baselines",
    "exit_skips",
    "random_skips",
    "block_influence",
    "shortgpt_skips",
    "greedy_skip_sets",
    "accuracy_scorer",
    "choose_skip_sets",
    "check_ks",
    "check_disjoint",
    "calibration_set",
]

BASELINES = ("shortgpt", "static", "random", "exit")
SEEDS = 5


class BaselineError(ValueError):
    """A baseline refuses its inputs (a K it cannot drop, calibration items that are evaluated or missing): the
    command line prints it as one line."""


def parse_baselines(specs: Sequence[str]) -> list[tuple[str, list[int]]]:
    """``["shortgpt:1,2,4", "exit:2"]`` -> ``[("shortgpt", [1, 2, 4]), ("exit", [2])]``."""
    out = []
    for spec in specs:
        method, _, ks = spec.partition(":")
        if method not in BASELINES or not ks:
            raise BaselineError(f"baseline {spec!r}: write METHOD:K[,K...] with METHOD one of {', '.join(BASELINES)}")
        try:
            values = sorted({int(k) for k in ks.split(",")})
        except ValueError:
            raise BaselineError(f"baseline {spec!r}: K must be whole numbers, e.g. {method}:1,2,4") from None
        if values[0] < 1:
            raise BaselineError(f"baseline {spec!r}: K must be >= 1")
        out.append((method, values))
    return out


def _check_k(num_blocks: int, k: int) -> None:
    if not 1 <= k < num_blocks:
        raise BaselineError(f"cannot skip {k} of {num_blocks} blocks: K must be in [1, {num_blocks - 1}]")


def max_skips(num_blocks: int, max_skip_run: int | None = 2) -> int:
    """The most blocks a skip set can hold with no more than ``max_skip_run`` consecutive skips (and one block
    executed)."""
    if max_skip_run is None:
        return num_blocks - 1
    return min(num_blocks - 1, num_blocks - num_blocks // (max_skip_run + 1))


def check_ks(num_blocks: int, baselines: Sequence[tuple[str, Sequence[int]]], max_skip_run: int = 2) -> None:
    """Refuse, before anything is scored, a K that a baseline cannot drop from ``num_blocks`` blocks
    (``random`` and ``static`` keep the skip-run limit; ``shortgpt`` and ``exit`` need one block left)."""
    for method, ks in baselines:
        limit = max_skips(num_blocks, max_skip_run if method in ("random", "static") else None)
        bad = [k for k in ks if not 1 <= k <= limit]
        if bad:
            rule = f" with at most {max_skip_run} consecutive skips" if method in ("random", "static") else ""
            raise BaselineError(f"baseline {method}:{','.join(map(str, ks))}: the model has {num_blocks} blocks, so "
                                f"{method} can drop 1 to {limit}{rule}; K {', '.join(map(str, bad))} cannot be dropped")


def exit_skips(num_blocks: int, k: int) -> list[int]:
    """Early exit: the last ``k`` blocks."""
    _check_k(num_blocks, k)
    return list(range(num_blocks - k, num_blocks))


def random_skips(num_blocks: int, k: int, seed: int, max_skip_run: int = 2, tries: int = 10_000) -> list[int]:
    """``k`` blocks drawn uniformly among the sets with no more than ``max_skip_run`` consecutive skips.

    The generator is seeded with ``(seed, k)``: one seed's sets of different
    K are independent draws. Seeded with ``seed`` alone, the first blocks
    drawn are the same for every K, so one seed's sets would be nested
    ([6] in [6, 11] in [0, 4, 6, 11]) and its rows across K one draw, not several.
    """
    _check_k(num_blocks, k)
    rng = random.Random(f"random-skips:{seed}:{k}")  # a str seed hashes to the same state on every run
    for _ in range(tries):
        skips = sorted(rng.sample(range(num_blocks), k))
        if skip_run_ok(skip_set_path(num_blocks, skips), max_skip_run):
            return skips
    raise BaselineError(f"no {k}-block skip set of {num_blocks} blocks has at most {max_skip_run} consecutive skips")


# --------------------------------------------------------------------------- ShortGPT


def _prompt_ids(example: Example, tokenizer: Any, reward: str, style: str | None) -> list[int]:
    """The prompt's tokens as evaluation encodes them (the cloze context, or the generation prompt)."""
    if reward == "loglik":
        context, continuations = cloze_requests(example, tokenizer, style=style or "plain")
        return encode_request(tokenizer, context, continuations[0])[0]
    prompt = generation_prompt(example, tokenizer, style=style or "auto")
    return encode_prompt(tokenizer, prompt, add_special_tokens=not use_chat_template(tokenizer, style or "auto"))


def _right_padded(rows: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows], device=device)
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=device)
    return ids, mask


def _states_through(model, ids: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
    """The hidden states entering each block, then the last block's output (what the final norm reads)."""
    final = []
    hook = decoder(model).norm.register_forward_pre_hook(lambda module, args: final.append(args[0]))
    try:
        states = block_states(model, input_ids=ids, attention_mask=mask)
    finally:
        hook.remove()
    return states + final[:1]


@torch.no_grad()
def block_influence(model, tokenizer, examples: Sequence[Example], *, reward: str = "loglik",
                    style: str | None = None, batch_size: int = 16) -> list[float]:
    """ShortGPT Block Influence of every block: ``1 - mean cos(input, output)`` over real prompt tokens."""
    if not examples:
        raise BaselineError("ShortGPT needs calibration examples")
    info = describe(model)
    total = torch.zeros(info.num_blocks, dtype=torch.float64)
    tokens = 0
    for start in range(0, len(examples), batch_size):
        rows = [_prompt_ids(e, tokenizer, reward, style) for e in examples[start : start + batch_size]]
        ids, mask = _right_padded(rows, info.device)
        states = _states_through(model, ids, mask)
        real = mask.bool()
        for i in range(info.num_blocks):
            cos = torch.nn.functional.cosine_similarity(states[i].double(), states[i + 1].double(), dim=-1)
            total[i] += cos[real].sum().cpu()
        tokens += int(real.sum())
    return (1.0 - total / tokens).tolist()


def shortgpt_skips(influence: Sequence[float], k: int) -> list[int]:
    """The ``k`` blocks of lowest influence (ties: the lower block)."""
    _check_k(len(influence), k)
    order = sorted(range(len(influence)), key=lambda i: (influence[i], i))
    return sorted(order[:k])


# --------------------------------------------------------------------------- static (greedy)

Score = Callable[[list[str]], list[tuple]]


def greedy_skip_sets(score: Score, num_blocks: int, max_k: int, max_skip_run: int = 2,
                     shortlist: int | None = None) -> dict[int, list[int]]:
    """Nested skip sets for K = 1..max_k: step K adds the block whose skip scores best with the K - 1 chosen.

    ``score(paths)`` returns one comparable value per path string (higher is
    better, e.g. ``(accuracy, mean margin)``); ties go to the lower block.
    ``shortlist``: after the first step (every single skip scored), later
    steps consider only the ``shortlist`` best single skips, which cuts the
    cost of K steps from about K * L to L + K * shortlist scored paths.
    """
    _check_k(num_blocks, max_k)
    chosen: list[int] = []
    sets = {}
    allowed = set(range(num_blocks))
    for k in range(1, max_k + 1):
        candidates = [b for b in range(num_blocks) if b not in chosen and b in allowed
                      and skip_run_ok(skip_set_path(num_blocks, chosen + [b]), max_skip_run)]
        if not candidates:
            raise BaselineError(f"static:{k}: no block can be added to the greedy skips {chosen} within "
                                f"{max_skip_run} consecutive skips; ask for K up to {k - 1}")
        scores = score([skip_set_path(num_blocks, chosen + [b]) for b in candidates])
        best = max(range(len(candidates)), key=lambda j: (scores[j], -candidates[j]))
        if k == 1 and shortlist is not None:
            ranked = sorted(range(len(candidates)), key=lambda j: (scores[j], -candidates[j]), reverse=True)
            allowed = {candidates[j] for j in ranked[:shortlist]}
        chosen = sorted(chosen + [candidates[best]])
        sets[k] = chosen
    return sets


def accuracy_scorer(model, tokenizer, examples: Sequence[Example], *, reward: str = "loglik",
                    style: str | None = None, normalize: str = "chars", max_new_tokens: int = 256,
                    evaluators: dict | None = None) -> Score:
    """``score(paths)``: per path, ``(accuracy, mean gold margin)`` on ``examples``, every path of an item scored
    in one pass (:func:`drllm.eval.scoring.score_paths`, each item's evaluator kept in ``evaluators`` between
    calls; generation: one path at a time, margin 0)."""
    evaluators = {} if evaluators is None else evaluators
    if not examples:
        raise BaselineError("static skip sets need selection examples")

    def score(paths: list[str]) -> list[tuple]:
        if reward == "loglik":
            rows = score_paths(model, tokenizer, examples, paths, style=style, normalize=normalize,
                               evaluators=evaluators)
        else:
            rows = [evaluate_path(model, tokenizer, examples, p, reward=reward, style=style,
                                  max_new_tokens=max_new_tokens) for p in paths]
        n = len(examples)
        return [(sum(r["correct"] for r in rs) / n, sum(r.get("margin", 0.0) for r in rs) / n) for rs in rows]

    return score


# --------------------------------------------------------------------------- dispatch


def check_disjoint(calibration: Sequence[Example], evaluated: Sequence[Example]) -> None:
    """Refuse calibration or selection items that are also evaluated: their figures would be chosen on the test."""
    shared = {e.id for e in calibration} & {e.id for e in evaluated}
    if shared:
        raise BaselineError(f"{len(shared)} calibration/selection items are also evaluated "
                            f"(e.g. {sorted(shared)[:3]}): take them from the train split, away from the evaluated "
                            "items")


def calibration_set(task: str, evaluated: Sequence[Example], *, n: int, dev_ids: Sequence[str] | None = None,
                    data_dir: str | os.PathLike | None = None,
                    train: Sequence[Example] | None = None) -> tuple[list[Example], str]:
    """Calibration/selection items and where they came from: the train split's dev part recorded with the
    routers (``dev_ids``: those of their ``selection.json``, :func:`drllm.eval.selection.read_selection`;
    None when none was recorded), else its first ``n`` items that are not evaluated.
    ``train``: the train items to draw from (default: the whole split)."""
    if train is None:
        train = load_task(task, "train", data_dir=data_dir)
    if dev_ids is not None:
        dev = set(dev_ids)
        missing = dev - {e.id for e in train}
        if missing:
            raise BaselineError(f"{len(missing)} dev ids recorded with the routers are not {task} train items "
                                f"(e.g. {sorted(map(str, missing))[:3]})")
        chosen = [e for e in train if e.id in dev]
        source = f"dev part recorded with the routers ({len(chosen)} {task} train items)"
    else:
        taken = {e.id for e in evaluated}
        chosen = [e for e in train if e.id not in taken][:n]
        source = f"first {len(chosen)} {task} train items"
    check_disjoint(chosen, evaluated)
    return chosen, source


def choose_skip_sets(model, tokenizer, method: str, ks: Sequence[int], *, calibration: Sequence[Example] = (),
                     reward: str = "loglik", style: str | None = None, normalize: str = "chars",
                     batch_size: int = 16, max_new_tokens: int = 256, seeds: int = SEEDS,
                     max_skip_run: int = 2, shortlist: int | None = None,
                     evaluators: dict | None = None) -> tuple[dict[int, list[list[int]]], dict]:
    """Skip sets of ``method`` for each K (one per seed for ``random``, else one), and what chose them.

    ``calibration`` (``shortgpt``: prompts; ``static``: the selection set) is
    encoded and scored as the evaluation does, by ``reward``/``style``/``normalize``;
    ``shortlist`` and ``evaluators``: as :func:`greedy_skip_sets` and :func:`accuracy_scorer`.
    """
    L = describe(model).num_blocks
    if method == "exit":
        return {k: [exit_skips(L, k)] for k in ks}, {}
    if method == "random":
        return {k: [random_skips(L, k, seed, max_skip_run) for seed in range(seeds)] for k in ks}, {"seeds": seeds}
    info = {"calibration_ids": [e.id for e in calibration]}
    if method == "shortgpt":
        influence = block_influence(model, tokenizer, calibration, reward=reward, style=style, batch_size=batch_size)
        return {k: [shortgpt_skips(influence, k)] for k in ks}, {**info, "block_influence": influence}
    if method == "static":
        score = accuracy_scorer(model, tokenizer, calibration, reward=reward, style=style, normalize=normalize,
                                max_new_tokens=max_new_tokens, evaluators=evaluators)
        sets = greedy_skip_sets(score, L, max(ks), max_skip_run, shortlist)
        return {k: [sets[k]] for k in ks}, info
    raise BaselineError(f"unknown baseline {method!r}: choose from {', '.join(BASELINES)}")
