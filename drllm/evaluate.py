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

:func:`compare` puts the routers (at several lambdas) beside the baselines of
:mod:`drllm.baselines` (static skip sets, each a forced path through the same
executor) on the same items and scoring: one entry per method and setting,
each with accuracy, interval, blocks per pass and McNemar's exact test
against vanilla on the same items.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch

from . import baselines as bl
from .paths import path_to_str
from .routers import Routers
from .runtime.adapters import describe
from .runtime.patch import forced_paths, is_patched, last_paths, patch, unpatch
from .tasks import Example, encode_prompt, generate_answers, generation_prompt, score_choices, use_chat_template

__all__ = ["evaluate", "lam_sweep", "evaluate_path", "score_paths", "compare", "choose_baselines", "verdict",
           "frontier_table", "routers_vs_baselines", "wilson_interval", "mcnemar_exact", "REWARDS"]

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


# --------------------------------------------------------------------------- runs


def _loglik_rows(model, tokenizer, examples, *, routed: bool, batch_size: int, style: str, normalize: str,
                 path: str | None = None) -> list[dict]:
    fixed = path or "1" * describe(model).num_blocks
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
            row["path"] = fixed
            row["layers"] = _length(fixed) * len(ex.choices)
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


def _generate_rows(model, tokenizer, examples, *, routed: bool, batch_size: int, style: str, max_new_tokens: int,
                   path: str | None = None):
    fixed = path or "1" * describe(model).num_blocks
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
            key = tuple(encode_prompt(tokenizer, prompt, add_special_tokens=not chat))
            if key not in target.seen:
                raise RuntimeError(f"no recorded path for example {ex.id!r}: prompt encoding differs from generate_answers")
            path = target.seen[key]
            row["path"] = path_to_str(path)
            row["layers"] = int(path.sum()) * passes
        else:
            row["path"] = fixed
            row["layers"] = _length(fixed) * passes
        out.append(row)
    return out


def _length(path: str) -> int:
    return sum(int(c) for c in path)


def _run(model, tokenizer, examples, reward, routed, batch_size, style, normalize, max_new_tokens, path=None):
    if reward == "loglik":
        return _loglik_rows(model, tokenizer, examples, routed=routed, batch_size=batch_size,
                            style=style or "plain", normalize=normalize, path=path)
    return _generate_rows(model, tokenizer, examples, routed=routed, batch_size=batch_size,
                          style=style or "auto", max_new_tokens=max_new_tokens, path=path)


def _summary(rows: list[dict], num_blocks: int) -> dict:
    n = len(rows)
    k = sum(r["correct"] for r in rows)
    lo, hi = wilson_interval(k, n)
    lengths = [_length(r["path"]) for r in rows]
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
            "path_length": _length(b["path"]),
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


def lam_sweep(model, tokenizer, routers: Routers, examples: Sequence[Example], lams: Sequence[float], *,
              baseline: dict | None = None, **kwargs) -> list[dict]:
    """:func:`evaluate` at each control-knob value in ``lams``, scoring the vanilla model once (or never,
    given a ``baseline``)."""
    results: list[dict] = []
    for lam in lams:
        results.append(evaluate(model, tokenizer, routers, examples, lam=float(lam),
                                baseline=results[0] if results else baseline, **kwargs))
    return results


def _as_baseline(examples: Sequence[Example], vanilla: list[dict], reward: str) -> dict:
    """Vanilla rows in the shape :func:`evaluate` takes as ``baseline``, so a sweep does not score them again."""
    return {"reward": reward, "examples": [{"id": e.id, "vanilla_row": r} for e, r in zip(examples, vanilla)]}


# --------------------------------------------------------------------------- baselines at equal compute


def evaluate_path(model, tokenizer, examples: Sequence[Example], path: str, *, reward: str = "loglik",
                  batch_size: int = 16, max_new_tokens: int = 256, style: str | None = None,
                  normalize: str = "chars") -> list[dict]:
    """Per-example rows (as in :func:`evaluate`'s ``vanilla_row``) of ``model`` forced onto ``path`` for every input."""
    if reward not in REWARDS:
        raise ValueError(f"reward must be one of {REWARDS}, got {reward!r}")
    with forced_paths(model, [int(c) for c in path]):
        return _run(model, tokenizer, examples, reward, False, batch_size, style, normalize, max_new_tokens, path=path)


def score_paths(model, tokenizer, examples: Sequence[Example], paths: Sequence[str], *, style: str | None = None,
                normalize: str = "chars", max_paths: int = 16, progress: bool = False) -> list[list[dict]]:
    """Rows (as :func:`evaluate_path`'s) of every forced path on every example: ``[path][example]``.

    Why: a comparison scores some 25 static paths per item. Here every path
    of one item goes through one :class:`~drllm.search.evaluator.PathEvaluator`
    (log-likelihood, choices packed in one sequence): the default path runs
    once and records the state entering each block, and every other path
    starts at its first edited block from that state, so the blocks before it
    are never recomputed. Same scoring as :func:`evaluate_path` (acc_norm),
    to float tolerance.
    """
    from .search.evaluator import PathEvaluator

    rows: list[list[dict]] = [[] for _ in paths]
    for ex in _progress(examples, progress, "forced paths"):
        evaluator = PathEvaluator(model, tokenizer, ex, mode="loglik", style=style or "plain", normalize=normalize,
                                  max_paths=max_paths)
        for out, result in zip(rows, evaluator.evaluate(list(paths))):
            choice = ex.labels.index(result.prediction)
            out.append({"correct": int(choice == ex.gold_index), "choice": choice, "margin": result.margin, "passes": len(ex.choices), "path": result.path,
                        "layers": result.length * len(ex.choices)})
    return rows


def _progress(items, show: bool, desc: str):
    if not show:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit="ex", dynamic_ncols=True)


def _path_rows(model, tokenizer, examples, paths: Sequence[str], *, reward: str, progress: bool = False,
               **settings) -> dict[str, list[dict]]:
    """Rows of each distinct forced path: all paths of an item in one pass (log-likelihood), else one by one."""
    paths = list(dict.fromkeys(paths))
    if reward == "loglik":
        rows = score_paths(model, tokenizer, examples, paths, style=settings["style"],
                           normalize=settings["normalize"], progress=progress)
    else:
        rows = [evaluate_path(model, tokenizer, examples, p, reward=reward, **settings) for p in paths]
    return dict(zip(paths, rows))


def _entry(method: str, setting, rows: list[dict], vanilla: list[dict], **extra) -> dict:
    """One row of the comparison: accuracy, interval, blocks per pass and the paired test against vanilla."""
    s = _summary(rows, len(rows[0]["path"]))
    return {
        "method": method,
        "setting": setting,
        "n": s["n"],
        "correct": s["correct"],
        "accuracy": s["accuracy"],
        "ci95": s["ci95"],
        "blocks_per_pass": s["mean_path_length"],
        "layers_per_example": s["layers_per_example"],
        "mcnemar": paired_test([r["correct"] for r in vanilla], [r["correct"] for r in rows]),
        "items": "".join(str(r["correct"]) for r in rows),
        **extra,
    }


def _seeded_entry(method: str, setting, runs: list[dict]) -> dict:
    """Several skip sets of one setting (random seeds): mean accuracy and its spread over the runs.

    ``correct`` is the mean over runs, ``ci95`` the Wilson interval of all
    runs' answers pooled, ``mcnemar`` the run with the median p-value;
    ``runs`` keeps every run's own figures.
    """
    accs = [r["accuracy"] for r in runs]
    mean = sum(accs) / len(accs)
    n, correct = runs[0]["n"], sum(r["correct"] for r in runs)
    median = sorted(runs, key=lambda r: r["mcnemar"]["p"])[len(runs) // 2]
    return {
        "method": method,
        "setting": setting,
        "n": n,
        "correct": correct / len(runs),
        "accuracy": mean,
        "ci95": list(wilson_interval(correct, n * len(runs))),
        "spread": {"std": math.sqrt(sum((a - mean) ** 2 for a in accs) / len(accs)), "min": min(accs),
                   "max": max(accs)},
        "blocks_per_pass": sum(r["blocks_per_pass"] for r in runs) / len(runs),
        "layers_per_example": sum(r["layers_per_example"] for r in runs) / len(runs),
        "mcnemar": median["mcnemar"],
        "skipped": [r["skipped"] for r in runs],
        "runs": runs,
    }


def choose_baselines(model, tokenizer, baselines: Sequence[tuple[str, Sequence[int]]], *,
                     calibration: Sequence[Example] = (), seeds: int = bl.SEEDS, reward: str = "loglik",
                     batch_size: int = 16, max_new_tokens: int = 256, style: str | None = None,
                     normalize: str = "chars") -> tuple[dict, dict]:
    """Each baseline's skip sets per K (:func:`drllm.baselines.choose_skip_sets`) and what chose them, by method;
    chosen once, they can be scored on several data sets (:func:`compare`'s ``skip_sets``)."""
    sets, info = {}, {}
    for method, ks in baselines:
        sets[method], info[method] = bl.choose_skip_sets(
            model, tokenizer, method, ks, calibration=calibration, seeds=seeds, reward=reward, style=style,
            normalize=normalize, batch_size=batch_size, max_new_tokens=max_new_tokens)
    return sets, info


def compare(model, tokenizer, examples: Sequence[Example], *, routers: Routers | None = None,
            lams: Sequence[float] = (0.0,), baselines: Sequence[tuple[str, Sequence[int]]] = (),
            calibration: Sequence[Example] = (), seeds: int = bl.SEEDS, reward: str = "loglik",
            batch_size: int = 16, max_new_tokens: int = 256, style: str | None = None,
            normalize: str = "chars", skip_sets: tuple[dict, dict] | None = None, progress: bool = False) -> dict:
    """Vanilla, the routers at each of ``lams`` and every baseline ``(method, Ks)`` on the same ``examples``.

    ``calibration`` (ShortGPT prompts, the static selection set) must share
    no item with ``examples``; ``skip_sets``, a :func:`choose_baselines`
    result, stands in for ``baselines`` and ``calibration``. Vanilla (the
    all-ones path) and every baseline are forced paths, scored together
    (:func:`score_paths`). Returns ``{"methods", "sweep", "baselines"}``:
    ``methods`` one entry per method and setting (K, or lambda for routers),
    each with ``items``, its per-example correctness as a 0/1 string;
    ``sweep`` the :func:`lam_sweep` results; ``baselines`` what chose each
    method's skip sets (calibration ids, block influence).
    """
    bl.check_disjoint(calibration, examples)
    settings = dict(batch_size=batch_size, max_new_tokens=max_new_tokens, style=style, normalize=normalize)
    if skip_sets is None:
        skip_sets = choose_baselines(model, tokenizer, baselines, calibration=calibration, seeds=seeds,
                                     reward=reward, **settings)
    sets, chosen = skip_sets
    L = describe(model).num_blocks
    forced = ["1" * L] + [bl.skip_path(L, s) for by_k in sets.values() for ss in by_k.values() for s in ss]
    rows = _path_rows(model, tokenizer, examples, forced, reward=reward, progress=progress, **settings)
    vanilla = rows["1" * L]
    sweep = []
    if routers is not None:
        sweep = lam_sweep(model, tokenizer, routers, examples, lams, reward=reward,
                          baseline=_as_baseline(examples, vanilla, reward), **settings)
    methods = [_entry("vanilla", None, vanilla, vanilla)]
    methods += [_entry("routers", r["lam"], [e["routed_row"] for e in r["examples"]], vanilla) for r in sweep]
    for method, by_k in sets.items():
        for k, skip_lists in by_k.items():
            runs = [_entry(method, k, rows[bl.skip_path(L, s)], vanilla, skipped=s) for s in skip_lists]
            methods.append(_seeded_entry(method, k, runs) if len(runs) > 1 else runs[0])
    return {"methods": methods, "sweep": sweep, "baselines": chosen}


def verdict(entry: dict, alpha: float = 0.05) -> str:
    """What the paired test says about ``entry`` against vanilla."""
    if entry["method"] == "vanilla":
        return "-"
    t = entry["mcnemar"]
    if t["p"] >= alpha:
        return "no significant difference"
    return "better than vanilla" if t["only_method"] > t["only_vanilla"] else "worse than vanilla"


def frontier_table(methods: Sequence[dict]) -> tuple[list[str], list[list[str]]]:
    """Headers and rows of the comparison table (for :func:`drllm.commands.common.format_table`)."""
    vanilla = next(m for m in methods if m["method"] == "vanilla")
    rows = []
    for m in methods:
        acc = f"{m['accuracy']:.3f} [{m['ci95'][0]:.3f}, {m['ci95'][1]:.3f}]"
        if "spread" in m:
            acc += f" ±{m['spread']['std']:.3f}"
        t = m["mcnemar"]
        test = "-" if m is vanilla else f"{t['p']:.3g} ({t['only_vanilla']}/{t['only_method']})"
        skipped = m.get("skipped", "-")
        if "runs" in m:
            skipped = f"{len(m['runs'])} seeds"
        setting = "-" if m["setting"] is None else f"{m['setting']:g}"
        rows.append([m["method"], setting, acc, f"{m['blocks_per_pass']:.2f}",
                     f"{m['accuracy'] - vanilla['accuracy']:+.3f}", test, verdict(m), str(skipped)])
    headers = ["method", "K / λ", "accuracy [95% CI]", "blocks/pass", "Δ accuracy",
               "McNemar p (only vanilla/only method)", "vs vanilla", "skipped blocks"]
    return headers, rows


def routers_vs_baselines(methods: Sequence[dict], alpha: float = 0.05) -> tuple[list[str], list[list[str]]]:
    """Headers and rows: each router setting against each baseline setting, McNemar's exact test on the same
    items (random: against each seed's skip set, the seed with the median p, as against vanilla)."""
    routers = [m for m in methods if m["method"] == "routers"]
    others = [m for m in methods if m["method"] not in ("vanilla", "routers")]
    rows = []
    for r in routers:
        for m in others:
            tests = sorted((paired_test([int(c) for c in run["items"]], [int(c) for c in r["items"]])
                            for run in m.get("runs", [m])), key=lambda t: t["p"])
            t = tests[len(tests) // 2]
            if t["p"] >= alpha:
                word = "within noise"
            else:
                word = "routers above" if t["only_method"] > t["only_vanilla"] else "routers below"
            rows.append([f"{r['setting']:g}", f"{r['blocks_per_pass']:.2f}", f"{m['method']}:{m['setting']}",
                         f"{m['blocks_per_pass']:.2f}", f"{r['accuracy'] - m['accuracy']:+.3f}",
                         f"{t['p']:.3g} ({t['only_vanilla']}/{t['only_method']})", word])
    headers = ["routers λ", "routers blocks/pass", "baseline", "baseline blocks/pass", "Δ accuracy (routers - baseline)",
               "McNemar p (only baseline/only routers)", "routers vs baseline"]
    return headers, rows
