"""Accuracy and layer accounting: a frozen model with and without routers, on the same items.

For each example the vanilla model (every block once) and the routed model
(the routers' path, decided once on the prompt) are scored the same way:

- ``reward="loglik"``: every choice of a multiple-choice item is scored by
  log-likelihood (:func:`drllm.tasks.score_choices`, acc_norm), one forward
  pass per choice; the routers pool over the context only (``routing_mask``),
  so every choice of an item runs on the same path.
- ``reward="generate"``: greedy generation and answer extraction
  (:func:`drllm.tasks.generate_answers`).

**Layers per example** counts block applications over every forward pass of
the example: ``path length x forward passes``. Log-likelihood: one pass per
choice. Generation: the prefill, which yields the first new token, plus one
decode step for every later new token (the last token is never fed back), so
``max(new_tokens, 1)`` passes. The vanilla path length is the number of blocks.

Accuracy comes with a 95% Wilson score interval.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch

from .paths import path_to_str
from .routers import Routers
from .runtime.adapters import describe
from .runtime.patch import is_patched, last_paths, patch, unpatch
from .tasks import Example, generate_answers, generation_prompt, score_choices, use_chat_template

__all__ = ["evaluate", "lam_sweep", "wilson_interval", "REWARDS"]

REWARDS = ("loglik", "generate")
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


# --------------------------------------------------------------------------- runs


def _loglik_rows(model, tokenizer, examples, *, routed: bool, batch_size: int, style: str, normalize: str) -> list[dict]:
    L = describe(model).num_blocks
    paths: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(examples))}

    def forward(m, *, input_ids, attention_mask, routing_mask, rows, **kw):
        out = m(input_ids=input_ids, attention_mask=attention_mask, routing_mask=routing_mask, **kw)
        decided = last_paths(m)
        for r, owner in enumerate(rows):
            paths[int(owner)].append(decided[r])
        return out.logits

    scores = score_choices(
        model, tokenizer, examples, batch_size=batch_size, routing_mask=routed, normalize=normalize, style=style,
        forward=forward if routed else None, rows="example",
    )
    out = []
    for i, (ex, s) in enumerate(zip(examples, scores)):
        row = {"correct": int(s.correct), "choice": int(s.choice), "margin": float(s.margin), "passes": len(ex.choices)}
        if routed:
            taken = torch.stack(paths[i])  # one path per choice's forward pass
            row["path"] = path_to_str(taken[0])
            row["consistent"] = bool((taken == taken[0]).all())
            row["layers"] = int(taken.sum())
        else:
            row["path"] = "1" * L
            row["layers"] = L * len(ex.choices)
        out.append(row)
    return out


class _Recorder:
    """Stands in for the model in :func:`generate_answers`: records each batch's rows and paths."""

    def __init__(self, model):
        self._model = model
        self.seen: dict[tuple[int, ...], torch.Tensor] = {}

    def __getattr__(self, name):
        return getattr(self._model, name)

    def generate(self, input_ids=None, attention_mask=None, **kw):
        out = self._model.generate(input_ids=input_ids, attention_mask=attention_mask, **kw)
        decided = last_paths(self._model)
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        for r in range(input_ids.shape[0]):
            self.seen[tuple(input_ids[r][mask[r].bool()].tolist())] = decided[r]
        return out


def _generate_rows(model, tokenizer, examples, *, routed: bool, batch_size: int, style: str, max_new_tokens: int):
    L = describe(model).num_blocks
    target = _Recorder(model) if routed else model
    gens = generate_answers(target, tokenizer, examples, max_new_tokens=max_new_tokens, batch_size=batch_size,
                            style=style)
    chat = use_chat_template(tokenizer, style)
    out = []
    for ex, g in zip(examples, gens):
        passes = max(int(g.new_tokens), 1)
        row = {"correct": int(g.correct), "prediction": g.prediction, "new_tokens": int(g.new_tokens), "passes": passes}
        if routed:
            prompt = generation_prompt(ex, tokenizer, style=style)
            key = tuple(tokenizer(prompt, add_special_tokens=not chat)["input_ids"])
            if key not in target.seen:
                raise RuntimeError(f"no recorded path for example {ex.id!r}: prompt encoding differs from generate_answers")
            path = target.seen[key]
            row["path"] = path_to_str(path)
            row["layers"] = int(path.sum()) * passes
        else:
            row["path"] = "1" * L
            row["layers"] = L * passes
        out.append(row)
    return out


def _run(model, tokenizer, examples, reward, routed, batch_size, style, normalize, max_new_tokens):
    if reward == "loglik":
        return _loglik_rows(model, tokenizer, examples, routed=routed, batch_size=batch_size,
                            style=style or "plain", normalize=normalize)
    return _generate_rows(model, tokenizer, examples, routed=routed, batch_size=batch_size,
                          style=style or "auto", max_new_tokens=max_new_tokens)


def _summary(rows: list[dict], num_blocks: int) -> dict:
    n = len(rows)
    k = sum(r["correct"] for r in rows)
    lo, hi = wilson_interval(k, n)
    lengths = [sum(int(c) for c in r["path"]) for r in rows]
    out = {
        "n": n,
        "correct": k,
        "accuracy": k / n if n else 0.0,
        "ci95": [lo, hi],
        "mean_path_length": sum(lengths) / n if n else 0.0,
        "layers_per_example": sum(r["layers"] for r in rows) / n if n else 0.0,
        "forward_passes_per_example": sum(r["passes"] for r in rows) / n if n else 0.0,
    }
    counts = torch.zeros(num_blocks, 3, dtype=torch.long)
    for r in rows:
        for i, c in enumerate(r["path"]):
            counts[i, int(c)] += 1
    out["decision_counts"] = dict(zip(("skip", "execute", "repeat"), counts.sum(0).tolist()))
    out["per_layer_decisions"] = counts.tolist()
    return out


def evaluate(
    model: torch.nn.Module,
    tokenizer: Any,
    routers: Routers,
    examples: Sequence[Example],
    *,
    reward: str = "loglik",
    lam: float = 0.0,
    batch_size: int = 16,
    max_new_tokens: int = 256,
    style: str | None = None,
    normalize: str = "chars",
    baseline: dict | None = None,
) -> dict:
    """Vanilla and routed accuracy and layer counts of ``model`` on ``examples``.

    ``model`` must not be patched: it is patched with ``routers`` (and the
    control knob ``lam``) for the routed run and unpatched afterwards.
    ``style`` is the prompt style (default ``"plain"`` cloze for
    ``loglik``, ``"auto"`` for ``generate``). ``baseline``, an earlier
    result of this function on the same examples and settings, supplies the
    vanilla run (a lambda sweep scores the vanilla model once).

    Returns ``{"reward", "lam", "num_blocks", "n", "vanilla", "routed",
    "difference", "examples", "decisions"}``: ``vanilla`` / ``routed`` hold
    ``accuracy``, ``ci95`` (Wilson), ``correct``, ``mean_path_length``,
    ``layers_per_example``, ``forward_passes_per_example``,
    ``decision_counts`` and ``per_layer_decisions`` (``[L][3]`` counts);
    ``difference`` is routed minus vanilla (``accuracy``, ``layers_per_example``,
    ``mean_path_length``), the ``layers_ratio`` and the paired outcome counts;
    ``examples`` has one entry per example (id, vanilla and routed
    correctness, path, layers...), ``decisions`` the routed path strings.
    """
    if reward not in REWARDS:
        raise ValueError(f"reward must be one of {REWARDS}, got {reward!r}")
    if is_patched(model):
        raise RuntimeError("evaluate() patches the model itself: pass an unpatched model (drllm.unpatch(model))")
    if not examples:
        raise ValueError("no examples to evaluate")
    L = describe(model).num_blocks
    settings = dict(batch_size=batch_size, style=style, normalize=normalize, max_new_tokens=max_new_tokens)

    if baseline is not None:
        if [e["id"] for e in baseline["examples"]] != [e.id for e in examples] or baseline["reward"] != reward:
            raise ValueError("baseline was computed on other examples or with another reward")
        vanilla = [e["vanilla_row"] for e in baseline["examples"]]
    else:
        vanilla = _run(model, tokenizer, examples, reward, False, **settings)
    patch(model, routers, lam=lam)
    try:
        routed = _run(model, tokenizer, examples, reward, True, **settings)
    finally:
        unpatch(model)

    v, r = _summary(vanilla, L), _summary(routed, L)
    pairs = [(a["correct"], b["correct"]) for a, b in zip(vanilla, routed)]
    per_example = []
    for ex, a, b in zip(examples, vanilla, routed):
        entry = {
            "id": ex.id,
            "gold": ex.answer,
            "vanilla_correct": a["correct"],
            "routed_correct": b["correct"],
            "path": b["path"],
            "path_length": sum(int(c) for c in b["path"]),
            "vanilla_layers": a["layers"],
            "routed_layers": b["layers"],
            "vanilla_row": a,
            "routed_row": b,
        }
        per_example.append(entry)
    result = {
        "reward": reward,
        "lam": lam,
        "num_blocks": L,
        "n": len(examples),
        "vanilla": v,
        "routed": r,
        "difference": {
            "accuracy": r["accuracy"] - v["accuracy"],
            "layers_per_example": r["layers_per_example"] - v["layers_per_example"],
            "layers_ratio": r["layers_per_example"] / v["layers_per_example"] if v["layers_per_example"] else None,
            "mean_path_length": r["mean_path_length"] - v["mean_path_length"],
            "both_correct": sum(1 for a, b in pairs if a and b),
            "only_vanilla": sum(1 for a, b in pairs if a and not b),
            "only_routed": sum(1 for a, b in pairs if b and not a),
            "neither": sum(1 for a, b in pairs if not a and not b),
        },
        "examples": per_example,
        "decisions": [b["path"] for b in routed],
    }
    if reward == "loglik":
        result["routed"]["inconsistent_paths"] = sum(1 for b in routed if not b["consistent"])
    return result


def lam_sweep(model, tokenizer, routers: Routers, examples: Sequence[Example], lams: Sequence[float], **kwargs) -> list[dict]:
    """:func:`evaluate` at each control-knob value in ``lams``, scoring the vanilla model once."""
    results: list[dict] = []
    for lam in lams:
        results.append(evaluate(model, tokenizer, routers, examples, lam=float(lam),
                                baseline=results[0] if results else None, **kwargs))
    return results
