"""What the suites run: prompts (ARC-Easy questions, or random tokens), forced paths (evenly spread skips,
paper-statistics samples), and the model as vanilla or patched for the duration of a variant."""

from __future__ import annotations

import contextlib
import functools
import math

import torch

# Per-block decision statistics of Dr.LLM's routers (arXiv 2510.12773): about
# 85% agreement between rows, 2.3% repeats, 7.6% skips.
PAPER_AGREEMENT = 0.85
PAPER_SKIP = 0.076
PAPER_REPEAT = 0.023


# --------------------------------------------------------------------------- paths


def _solve_copy_rate(agreement: float, probs: list[float]) -> float:
    """Probability ``rho`` that a row copies the batch's consensus decision.

    Each row copies the consensus with probability ``rho`` and otherwise draws
    from ``probs``; the expected pairwise agreement is then
    ``rho^2 + (1 - rho^2) * S`` with ``S = sum(p^2)``.
    """
    s = sum(p * p for p in probs)
    if agreement <= s:
        return 0.0
    return math.sqrt(min(1.0, (agreement - s) / (1 - s)))


def sample_paths(batch: int, num_blocks: int, agreement: float = PAPER_AGREEMENT, skip: float = PAPER_SKIP,
                 repeat: float = PAPER_REPEAT, generator: torch.Generator | None = None) -> torch.Tensor:
    """``[batch, num_blocks]`` paths with the given decision rates and row agreement.

    Every decision is skip / execute / repeat with probabilities
    ``(skip, 1 - skip - repeat, repeat)``; ``agreement`` is the expected
    fraction of pairs of rows taking the same decision at a block. A
    consensus path is drawn from those rates and each row copies each of its
    decisions with a probability chosen to reach ``agreement``, else draws
    it afresh (which keeps the rates). Agreement below the independent
    draw's (``sum(p^2)``, 0.82 for the paper's rates) is not reachable and
    gives independent rows. A row never skips every block.
    """
    probs = [skip, 1.0 - skip - repeat, repeat]
    if min(probs) < 0:
        raise ValueError(f"skip ({skip}) and repeat ({repeat}) rates must be >= 0 and sum to <= 1")
    rho = _solve_copy_rate(agreement, probs)
    p = torch.tensor(probs, dtype=torch.float64)
    consensus = torch.multinomial(p, num_blocks, replacement=True, generator=generator)
    fresh = torch.multinomial(p, batch * num_blocks, replacement=True, generator=generator).view(batch, num_blocks)
    copy = torch.rand(batch, num_blocks, generator=generator, dtype=torch.float64) < rho
    paths = torch.where(copy, consensus.expand(batch, -1), fresh).to(torch.int64)
    dead = paths.sum(1) == 0
    paths[dead, num_blocks // 2] = 1
    return paths


def path_statistics(paths: torch.Tensor) -> dict:
    """Skip and repeat rates, and the mean pairwise agreement between rows per block."""
    paths = torch.as_tensor(paths)
    batch = paths.shape[0]
    stats = {"skip": float((paths == 0).double().mean()), "repeat": float((paths == 2).double().mean())}
    if batch > 1:
        counts = torch.stack([(paths == v).sum(0) for v in range(3)]).double()  # [3, L]
        stats["agreement"] = float(((counts * (counts - 1)).sum(0) / (batch * (batch - 1))).mean())
    else:
        stats["agreement"] = 1.0
    return stats


def union_passes(paths: torch.Tensor) -> int:
    """(block, pass) pairs that at least one row runs: the blocks a batched step must execute."""
    paths = torch.as_tensor(paths)
    return int((paths >= 1).any(0).sum() + (paths == 2).any(0).sum())


def evenly_skipped_path(num_blocks: int, k: int) -> torch.Tensor:
    """A ``[num_blocks]`` int64 path skipping ``k`` blocks spread evenly over the middle of the model."""
    path = torch.ones(num_blocks, dtype=torch.int64)
    if k:
        lo, hi = (1, num_blocks - 2) if num_blocks > k + 2 else (0, num_blocks - 1)
        path[torch.linspace(lo, hi, k).round().long()] = 0
    if int((path == 0).sum()) != k:
        raise ValueError(f"cannot skip {k} of {num_blocks} blocks evenly")
    return path


# --------------------------------------------------------------------------- prompts and the model


def random_tokens(model, batch: int, length: int, seed: int) -> torch.Tensor:
    """``[batch, length]`` random token ids (never 0, the pad id) on the model's device."""
    g = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    return torch.randint(1, vocab, (batch, length), generator=g).to(model.device)


@functools.lru_cache(maxsize=4)
def _questions(tokenizer_path: str, task: str) -> tuple:
    """Token ids of every question of ``task`` (its default split) as the budget routers read it (the cloze
    context)."""
    from transformers import AutoTokenizer

    from ..tasks.data import load_task
    from ..tasks.prompts import cloze_context, encode_prompt

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    return tuple(tuple(encode_prompt(tokenizer, cloze_context(e, tokenizer, style="plain"), cloze=True))
                 for e in load_task(task))


def prompt_batch(model, cfg, batch: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, mask)`` of ``batch`` prompts on the model's device: with ``cfg.tokenizer``, a seeded draw of
    ``cfg.task``'s questions, left-padded (the text the routers decide on, so their picks are real);
    else random tokens of ``cfg.prompt_length``."""
    from ..batching import pad_batch

    if not cfg.tokenizer:
        ids = random_tokens(model, batch, cfg.prompt_length, seed)
        return ids, torch.ones_like(ids)
    questions = _questions(cfg.tokenizer, cfg.task)
    g = torch.Generator().manual_seed(seed)
    picks = torch.randperm(len(questions), generator=g)[:batch].tolist()
    if len(picks) < batch:
        raise ValueError(f"{cfg.task} has {len(questions)} questions, fewer than a batch of {batch}")
    ids, mask = pad_batch([questions[i] for i in picks], 0, left=True)
    return ids.to(model.device), mask.to(model.device)


def generate_exactly(model, ids: torch.Tensor, new_tokens: int, static: bool = False, mask: torch.Tensor | None = None):
    """Greedy ``generate`` of exactly ``new_tokens`` tokens after ``ids`` (``mask``: its padding mask, default
    none; ``static``: on a static cache, with transformers' own compilation off, as compiled models are timed)."""
    extra = dict(cache_implementation="static", disable_compile=True) if static else {}
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids) if mask is None else mask,
                              max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                              **extra)


def unpatched(model):
    """Setup of the vanilla model: nothing to patch."""
    import drllm

    if drllm.is_patched(model):
        raise RuntimeError("the benchmarked model must not be patched")
    return model


@contextlib.contextmanager
def routed(model, paths=None, routers=None):
    """The model patched (with ``routers``), optionally on forced ``paths``, for the duration."""
    import drllm

    drllm.patch(model, routers)
    try:
        with drllm.forced_paths(model, paths) if paths is not None else contextlib.nullcontext():
            yield model
    finally:
        drllm.unpatch(model)


# --------------------------------------------------------------------------- budget routers


def budget_routers(model, cfg):
    """``(routers, budget)``: the budget routers whose picks the suites decode and the budget they run at.

    ``cfg.routers`` (a ``drllm train --budget`` directory) at ``cfg.budget``, else a stand-in of the same kind:
    head ``sets`` with a vocabulary of three evenly spread skip sets (shifted by one block) of ``cfg.budget``
    blocks (at most a third of the blocks after the tap), random weights (seed ``cfg.seed``) scaled so each prompt
    gets a clear pick.
    """
    import drllm

    if cfg.routers:
        return drllm.BudgetRouters.from_pretrained(cfg.routers, device=model.device), cfg.budget
    L, tap = model.config.num_hidden_layers, 2
    budget = min(cfg.budget, max(1, (L - tap) // 3))
    base = [b for b in range(L) if evenly_skipped_path(L, budget)[b] == 0]
    sets = []
    for shift in (0, 1, -1):
        skips = sorted({min(max(b + shift, tap), L - 1) for b in base})
        if len(skips) == budget and skips not in sets:
            sets.append(skips)
    torch.manual_seed(cfg.seed)
    routers = drllm.BudgetRouters(model.config.model_type, model.config.hidden_size, L, tap=tap, head="sets",
                                  sets={budget: sets})
    with torch.no_grad():
        routers.mlp.fc2.weight.mul_(30.0)
    return routers.to(model.device), budget


def vocabulary(routers, budget: int) -> list[torch.Tensor]:
    """The paths budget routers of head ``sets`` choose among at ``budget`` (none for head ``blocks``)."""
    if routers.head != "sets":
        return []
    paths = []
    for skips in routers.sets[budget]:
        path = torch.ones(routers.num_blocks, dtype=torch.int64)
        path[list(skips)] = 0
        paths.append(path)
    return paths
