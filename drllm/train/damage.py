"""Continuous damage targets: what skipping each candidate block set does to each item, on the frozen model.

Why: 3-way per-block labels from the shortest correct path are noisy where
the model's answers are near ties, and they say nothing about how much a
skip costs. Budget routers instead learn to predict a damage per candidate
(a single block for the "blocks" head, a vocabulary set for the "sets"
head) and take the least damaging ones. This module measures those targets
with the batched, prefix-reusing :class:`drllm.search.PathEvaluator` (one
evaluator per item, every candidate in as few calls as ``max_paths`` and
``max_rows`` allow); it generalises :func:`drllm.search.probe_skips`.

Two modes per item:

- ``"choices"`` (a multiple-choice item, ``labels=True``): the default
  path's normalised per-choice scores (acc_norm), gold margin and
  correctness; per candidate the ``margin`` damage (default margin minus
  the candidate's), ``kl`` = KL(p_default || p_candidate) with ``p`` the
  softmax of the normalised per-choice scores (needs no gold label), and
  ``correct`` (0/1).
- ``"text"`` (an item without choices, or every item with ``labels=False``):
  no gold answer is read; ``kl`` is the KL divergence of the next-token
  distributions at the prompt's positions, default path against candidate,
  averaged over the prompt's tokens. The prompt is the cloze context of a
  multiple-choice item (style "plain" unless given), else the generation
  prompt (style "auto"): the tokens routers pool over.

Records (one JSONL line per item, appended and fsynced, resumed by id,
under the lock and settings check of the search's records): ``id``,
``task``, ``mode``, ``num_blocks``, ``prompt``, ``routing_tokens`` (as the
search records them), ``kl`` (``[N]``, one per candidate, >= 0), and in
``"choices"`` mode ``default_scores`` (``[C]``), ``default_margin``,
``default_correct``, ``margin`` (``[N]``) and ``correct`` (``[N]``); then
``evaluations`` (candidate paths run) and ``seconds``. The candidates
(sorted block lists, in order) are in the settings sidecar
(:func:`damage_candidates`).
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from ..artifacts import ArtifactError, claim_output, exclusive_lock, read_settings, settings_path
from ..paths import as_paths, default_path, path_from_str, skip_set_path
from ..runtime.adapters import describe
from ..runtime.control import forced_paths, observe
from ..search import PathEvaluator, read_records
from ..search.run import append_missing, output_settings
from ..tasks import Example, encode_prompt, use_chat_template
from ..tasks.prompts import cloze_context, generation_prompt

__all__ = ["measure_damage", "read_damage", "damage_candidates", "MODES"]

MODES = ("choices", "text")
KIND = "damage"
_FIX = "measure the damage again into a new file (drllm.train.measure_damage)"


def _check_candidates(candidates: Any, num_blocks: int | None, where: str) -> list[list[int]]:
    """``candidates`` as a list of sorted, distinct, non-empty block lists (no set twice); the error says
    which one is wrong."""
    if not isinstance(candidates, (list, tuple)) or not candidates:
        raise ValueError(f"{where}: candidates must be a non-empty list of skip sets (sorted block lists)")
    out, seen = [], set()
    for k, c in enumerate(candidates):
        blocks = list(c) if isinstance(c, (list, tuple)) else None
        ok = (blocks and all(isinstance(b, int) and not isinstance(b, bool) and b >= 0 for b in blocks)
              and all(a < b for a, b in zip(blocks, blocks[1:])))
        if not ok:
            raise ValueError(f"{where}: candidate {k} ({c!r}) must be a non-empty sorted list of distinct block "
                             "indices")
        if num_blocks is not None and blocks[-1] >= num_blocks:
            raise ValueError(f"{where}: candidate {k} ({blocks}) names a block >= {num_blocks}, the model's blocks")
        if tuple(blocks) in seen:
            raise ValueError(f"{where}: candidate {k} ({blocks}) is listed twice")
        seen.add(tuple(blocks))
        out.append(blocks)
    return out


# ------------------------------------------------------------------ measuring


def measure_damage(model: Any, tokenizer: Any, examples: Sequence[Example], out_path: str | os.PathLike, *,
                   candidates: Sequence[Sequence[int]], labels: bool = True, style: str | None = None,
                   normalize: str = "chars", prefix: bool = True, max_paths: int = 64, max_rows: int = 64,
                   progress: bool = True, settings: dict | None = None, overwrite: bool = False) -> list[dict]:
    """Measure every candidate skip set's damage on each example into ``out_path`` (skipping ids already
    there); returns the records of ``examples`` in their order.

    ``labels=False``: every item in ``"text"`` mode (no gold answer read).
    ``style``, ``normalize``: as :class:`drllm.search.SearchConfig`.
    ``prefix``, ``max_paths``, ``max_rows``: speed only (as the evaluator's).
    ``settings`` and ``overwrite``: as :func:`drllm.search.run_search`.
    """
    num_blocks = describe(model).num_blocks
    sets = _check_candidates(candidates, num_blocks, "measure_damage")
    ids = [e.id for e in examples]
    if len(set(ids)) != len(ids):
        raise ValueError("example ids must be unique (records are keyed by id)")
    paths = [skip_set_path(num_blocks, s) for s in sets]
    run = dict(style=style, normalize=normalize, prefix=prefix, max_paths=max_paths, max_rows=max_rows)
    out = Path(out_path)
    with exclusive_lock(out):
        claim_output(out, output_settings(KIND, model, examples, settings, candidates=sets,
                                          mode="labels" if labels else "label-free", style=style,
                                          normalize=normalize), overwrite)
        done = append_missing(out, examples, lambda ex: _measure(model, tokenizer, ex, paths, labels, run),
                              desc="damage", progress=progress, figures=_progress_figures)
    return [done[e.id] for e in examples]


def _measure(model: Any, tokenizer: Any, example: Example, paths: list[str], labels: bool, run: dict) -> dict:
    start = time.perf_counter()
    if labels and example.choices:
        rec = _choice_damage(model, tokenizer, example, paths, run)
    else:
        rec = _text_damage(model, tokenizer, example, paths, run)
    rec["seconds"] = round(time.perf_counter() - start, 4)
    return rec


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) over the last dimension, from log-probabilities (float64)."""
    log_p, log_q = log_p.double(), log_q.double()
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def _choice_damage(model: Any, tokenizer: Any, example: Example, paths: list[str], run: dict) -> dict:
    """A multiple-choice item: margins, answer-distribution KL and correctness of every candidate."""
    if len(example.choices) < 2 or example.gold_index is None:
        raise ValueError(f"example {example.id!r} has {len(example.choices)} choice(s) and gold index "
                         f"{example.gold_index}: margins need two choices and a gold one (labels=False measures "
                         "label-free targets)")
    ev = PathEvaluator(model, tokenizer, example, mode="loglik", prefix=run["prefix"], max_paths=run["max_paths"],
                       max_rows=run["max_rows"], style=run["style"], normalize=run["normalize"])
    default = ev.default
    results = ev.evaluate(paths)
    log_p = torch.tensor(default.scores, dtype=torch.float64).log_softmax(-1)
    log_q = torch.tensor([r.scores for r in results], dtype=torch.float64).log_softmax(-1)
    return {
        **_item(example, "choices", ev.num_blocks, ev.prompt, encode_prompt(tokenizer, ev.prompt, cloze=True)),
        "default_scores": list(default.scores),
        "default_margin": default.margin,
        "default_correct": default.reward,
        "margin": [default.margin - r.margin for r in results],
        "kl": [max(0.0, float(x)) for x in _kl(log_p[None], log_q)],
        "correct": [r.reward for r in results],
        "evaluations": ev.evaluations - 1,  # the default path is not a candidate
    }


def _item(example: Example, mode: str, num_blocks: int, prompt: str, tokens: list[int]) -> dict:
    return {"id": example.id, "task": example.task, "mode": mode, "num_blocks": num_blocks, "prompt": prompt,
            "routing_tokens": tokens}


def _text_prompt(tokenizer: Any, example: Example, style: str | None) -> tuple[str, list[int]]:
    """The prompt of a label-free item and its tokens, as the search encodes a routing context."""
    if example.choices:
        prompt = cloze_context(example, tokenizer, style=style or "plain")
        return prompt, encode_prompt(tokenizer, prompt, cloze=True)
    style = style or "auto"
    prompt = generation_prompt(example, tokenizer, style=style)
    return prompt, encode_prompt(tokenizer, prompt, add_special_tokens=not use_chat_template(tokenizer, style))


@torch.no_grad()
def _text_damage(model: Any, tokenizer: Any, example: Example, paths: list[str], run: dict) -> dict:
    """A label-free item: mean KL of the next-token distributions over the prompt's positions."""
    prompt, tokens = _text_prompt(tokenizer, example, run["style"])
    if not tokens:
        raise ValueError(f"example {example.id!r}: its prompt encodes to no tokens")
    info = describe(model)
    L, head = info.num_blocks, model.get_output_embeddings()
    ids = torch.tensor([tokens], device=info.device)
    mask = torch.ones_like(ids)
    states = [None] * L
    with forced_paths(model, default_path(L)), observe(model, states.__setitem__):
        hidden = info.base(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    log_p = head(hidden[0]).float().log_softmax(-1)
    kl = {}
    per_call = max(1, min(run["max_paths"], run["max_rows"]))
    for start in range(0, len(paths), per_call):  # the paths are distinct and none is the default
        chunk = paths[start : start + per_call]
        rows = as_paths(torch.stack([path_from_str(p) for p in chunk]), L)
        n = len(chunk)
        ctx = (forced_paths(model, rows, prefix=(states, torch.zeros(n, dtype=torch.long))) if run["prefix"]
               else forced_paths(model, rows))
        with ctx:
            hidden = info.base(input_ids=ids.expand(n, -1), attention_mask=mask.expand(n, -1),
                               use_cache=False).last_hidden_state
        for p, h in zip(chunk, hidden):  # one row's logits at a time: [T, V] rather than [n, T, V]
            kl[p] = max(0.0, float(_kl(log_p, head(h).float().log_softmax(-1)).mean()))
    return {**_item(example, "text", L, prompt, tokens), "kl": [kl[p] for p in paths], "evaluations": len(paths)}


def _progress_figures(records: Sequence[dict]) -> dict:
    evals = sum(r["evaluations"] for r in records)
    secs = sum(r["seconds"] for r in records)
    kls = [k for r in records for k in r["kl"]]
    figures = {"kl": f"{sum(kls) / max(len(kls), 1):.3g}", "evals_s": f"{evals / secs if secs > 0 else 0.0:.1f}"}
    scored = [r for r in records if r["mode"] == "choices"]
    if scored:
        figures["default"] = f"{sum(r['default_correct'] for r in scored) / len(scored):.3f}"
    return figures


# -------------------------------------------------------------------- reading


def damage_candidates(path: str | os.PathLike) -> list[list[int]]:
    """The candidate skip sets of a damage file (its settings sidecar), in record order, checked."""
    return _settings(Path(path))["candidates"]


def _settings(path: Path) -> dict:
    fix = _FIX
    if not path.is_file():
        raise ArtifactError(f"{path}: file not found; {fix}")
    recorded = read_settings(path)
    if recorded is None:
        raise ArtifactError(f"{path}: no {settings_path(path).name} saying which candidates were measured; {fix}")
    if recorded.get("kind") != KIND or recorded.get("mode") not in ("labels", "label-free"):
        raise ArtifactError(f"{settings_path(path)}: not the settings of damage targets "
                            f"(kind {recorded.get('kind')!r}, mode {recorded.get('mode')!r}); {fix}")
    try:
        recorded["candidates"] = _check_candidates(recorded.get("candidates"), None, str(settings_path(path)))
    except ValueError as err:
        raise ArtifactError(f"{err}; {fix}") from None
    return recorded


def read_damage(path: str | os.PathLike) -> list[dict]:
    """Damage records of ``path`` (:func:`measure_damage`), every line checked against its settings: unique ids,
    one value per candidate, finite values, KL >= 0, correctness 0/1, blocks within the model's. A torn last
    line (an interrupted write: no final newline) is left out, as the search's reader does; any other bad line
    is an error naming the file and line."""
    path = Path(path)
    recorded = _settings(path)
    sets, label_free = recorded["candidates"], recorded["mode"] == "label-free"
    fix = _FIX
    try:
        records = read_records(path)
    except ValueError as err:
        raise ArtifactError(f"{err}; {fix}") from None
    text = path.read_text(encoding="utf-8")
    lines = [k + 1 for k, line in enumerate(text.split("\n")) if line.strip()]
    if len(records) < len(lines) and text.endswith("\n"):  # a whole last line, not a torn write
        raise ArtifactError(f"{path}:{lines[-1]}: corrupt damage record (not a JSON object with an 'id'); {fix}")
    seen: dict[str, int] = {}
    num_blocks = None
    for rec, line in zip(records, lines):
        where = f"{path}:{line}"
        problem = _record_problem(rec, len(sets), label_free)
        if problem is None and rec["id"] in seen:
            problem = f"id {rec['id']!r} repeats line {seen[rec['id']]}"
        if problem is None and rec["num_blocks"] <= max(s[-1] for s in sets):
            problem = f"num_blocks {rec['num_blocks']} but a candidate skips block {max(s[-1] for s in sets)}"
        if problem is None and num_blocks not in (None, rec["num_blocks"]):
            problem = f"num_blocks {rec['num_blocks']} where earlier records have {num_blocks}"
        if problem is not None:
            raise ArtifactError(f"{where}: {problem}; {fix}")
        seen[rec["id"]] = line
        num_blocks = rec["num_blocks"]
    return records


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _bit(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x in (0, 1)


def _values_problem(rec: dict, name: str, n: int, ok, what: str) -> str | None:
    values = rec.get(name)
    if not isinstance(values, list) or len(values) != n:
        return f"{name!r} must be a list of {n} values (one per candidate)"
    bad = [k for k, v in enumerate(values) if not ok(v)]
    return f"{name!r}[{bad[0]}] = {values[bad[0]]!r} is not {what}" if bad else None


def _record_problem(rec: dict, n: int, label_free: bool) -> str | None:
    """What is wrong with one record (None when nothing is)."""
    if not isinstance(rec.get("id"), str) or not rec["id"]:
        return "record without a non-empty string 'id'"
    mode = rec.get("mode")
    if mode not in MODES or (label_free and mode != "text"):
        return f"mode {mode!r} is not one of {('text',) if label_free else MODES}"
    if not isinstance(rec.get("num_blocks"), int) or isinstance(rec["num_blocks"], bool) or rec["num_blocks"] < 1:
        return "record without a positive integer 'num_blocks'"
    tokens = rec.get("routing_tokens")
    if not isinstance(tokens, list) or not tokens or not all(_finite(t) and isinstance(t, int) and t >= 0
                                                             for t in tokens):
        return "'routing_tokens' must be a non-empty list of token ids"
    problems = [_values_problem(rec, "kl", n, lambda v: _finite(v) and v >= 0, "a finite KL >= 0")]
    if mode == "choices":
        scores = rec.get("default_scores")
        if not isinstance(scores, list) or len(scores) < 2 or not all(map(_finite, scores)):
            return "'default_scores' must be a list of at least 2 finite scores"
        if not _finite(rec.get("default_margin")):
            return "'default_margin' must be a finite number"
        if not _bit(rec.get("default_correct")):
            return "'default_correct' must be 0 or 1"
        problems += [_values_problem(rec, "margin", n, _finite, "a finite number"),
                     _values_problem(rec, "correct", n, _bit, "0 or 1")]
    elif any(k in rec for k in ("margin", "correct", "default_margin", "default_correct", "default_scores")):
        return "a 'text' record holds label fields (margin, correct)"
    return next((p for p in problems if p is not None), None)
