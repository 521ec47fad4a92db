"""Running the search over a dataset: one JSONL record per example.

Records are appended one line at a time, flushed and fsynced; a reader
(:func:`read_records`) ignores a torn last line, and a resumed run first
rewrites the file without it (temp file + ``os.replace``), so an interrupted
run never corrupts finished records. A rerun skips the ids already in the
file. One process at a time writes a file (an exclusive lock on
``OUT.lock``), and the settings that change the records are kept in
``OUT.settings.json`` (:func:`drllm.artifacts.claim_output`): a rerun under
other settings is refused instead of mixing two experiments in one file;
``overwrite`` starts over. Every example's search is seeded from
``(config.seed, example id)`` alone, so records do not depend on the order,
the sharding or on resuming.

Record fields: ``id``, ``task``, ``reward_mode``, ``prompt`` (the routing
context text: the cloze context in log-likelihood mode, the generation prompt
otherwise), ``gold``, ``num_blocks``, ``min_margin`` (log-likelihood mode:
how far the gold answer must lead for a path to win; null otherwise),
``default_reward``, ``default_margin``, ``best_path`` (``"1101..."``, or null
when the default path does not win and no winning path was found),
``best_reward``, ``best_margin``, ``best_length`` (null with a null
``best_path``), ``good_paths`` (winning paths, best first:
``{"path", "reward", "margin", "length"}``), ``evaluations``, ``simulations``,
``stopped_early``, ``seconds``; and what router training needs, so that it
reads this file alone: ``routing_tokens`` (the prompt's token ids, as
:func:`drllm.tasks.encode_prompt` encodes them for scoring: the tokens routers
pool over) and ``example`` (the item's :class:`~drllm.tasks.Example` fields
but ``meta``, to score it on the training's dev part). Records of an older
drllm lack these two.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import tempfile
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from ..artifacts import (
    ArtifactError, claim_output, exclusive_lock, model_fingerprint, read_settings, settings_diff, settings_path,
    write_json,
)
from ..tasks import Example, encode_prompt, use_chat_template
from .evaluator import MODES, PathEvaluator
from .mcts import MCTSConfig, mcts_search

__all__ = [
    "SearchConfig",
    "search_example",
    "run_search",
    "read_records",
    "merge_shards",
    "shard_path",
    "shard_examples",
    "output_settings",
    "summarize",
    "wait_for_shards",
]


@dataclass
class SearchConfig(MCTSConfig):
    """MCTS settings plus how paths are evaluated (see :class:`~drllm.search.mcts.MCTSConfig`)."""

    prefix: bool = True  # reuse default-path block states before the first edited block
    max_rows: int = 64  # rows per batched call in log-likelihood mode (candidates x choices)
    style: str | None = None  # prompt style: default "plain" cloze for loglik, "auto" (chat) for generate
    normalize: str = "chars"  # acc_norm
    max_new_tokens: int = 32  # generation mode
    max_good_paths: int | None = None  # keep at most this many good paths per record (None: all)
    min_margin: float = 0.0  # loglik: a path wins only if the gold answer leads by this normalised margin

    def mcts(self) -> MCTSConfig:
        names = {f.name for f in fields(MCTSConfig)}
        return MCTSConfig(**{k: v for k, v in asdict(self).items() if k in names})


# SearchConfig fields that change speed, not records
_SPEED_ONLY = ("prefix", "max_rows")


def output_settings(kind: str, model: Any, examples: Sequence[Example], extra: dict | None = None,
                    **values: Any) -> dict:
    """What makes an output's records what they are (kept next to the file by :func:`claim_output`):
    its ``kind``, the model's weights, the task, ``values`` and the caller's ``extra`` (e.g. the split)."""
    tasks = ",".join(sorted({e.task for e in examples}))
    return {"kind": kind, "model": model_fingerprint(model), "task": tasks, **values, **(extra or {})}


def search_settings(model: Any, examples: Sequence[Example], config: SearchConfig, reward: str,
                    extra: dict | None = None) -> dict:
    """The settings a search output records: every :class:`SearchConfig` field that changes records."""
    values = {k: v for k, v in asdict(config).items() if k not in _SPEED_ONLY}
    return output_settings("search", model, examples, extra, reward=reward, **values)


def example_seed(seed: int, example_id: str) -> int:
    digest = hashlib.sha256(f"{seed}\0{example_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def search_example(model: Any, tokenizer: Any, example: Example, config: SearchConfig | None = None,
                   reward: str = "loglik", evaluator: PathEvaluator | None = None) -> dict:
    """Search one example and return its JSONL record."""
    config = config or SearchConfig()
    if reward not in MODES:
        raise ValueError(f"reward must be one of {MODES}, got {reward!r}")
    start = time.perf_counter()
    ev = evaluator or PathEvaluator(
        model, tokenizer, example, mode=reward, prefix=config.prefix, max_paths=config.batch,
        max_rows=config.max_rows, style=config.style, normalize=config.normalize, min_margin=config.min_margin,
        max_new_tokens=config.max_new_tokens,
    )
    res = mcts_search(ev.evaluate, ev.num_blocks, config.mcts(), random.Random(example_seed(config.seed, example.id)))
    good = res.good if config.max_good_paths is None else res.good[: config.max_good_paths]
    best = res.best
    return {
        "id": example.id,
        "task": example.task,
        "reward_mode": reward,
        "prompt": ev.prompt,
        "gold": example.answer,
        "num_blocks": ev.num_blocks,
        "min_margin": config.min_margin if reward == "loglik" else None,
        "default_reward": res.default.reward,
        "default_margin": res.default.margin,
        "best_path": best.path if best else None,
        "best_reward": best.reward if best else 0,
        "best_margin": best.margin if best else None,
        "best_length": best.length if best else None,
        "good_paths": [g.as_record() for g in good],
        "evaluations": ev.evaluations,
        "simulations": res.simulations,
        "stopped_early": res.stopped_early,
        "seconds": round(time.perf_counter() - start, 4),
        "routing_tokens": encode_prompt(
            tokenizer, ev.prompt, cloze=reward == "loglik",
            add_special_tokens=reward != "loglik" and not use_chat_template(tokenizer, ev.style)),
        "example": {f.name: getattr(example, f.name) for f in fields(Example) if f.name != "meta"},
    }


# ---------------------------------------------------------------------- files


def _parse_lines(text: str, path) -> tuple[list[dict], bool]:
    """Records of a JSONL text, and whether the text needs repair (a torn last line, dropped, or a
    missing final newline). A bad line that is not the last one is an error."""
    lines = text.split("\n")
    nonempty = [k for k, line in enumerate(lines) if line.strip()]
    records, torn = [], False
    for k in nonempty:
        try:
            rec = json.loads(lines[k])
            if not isinstance(rec, dict) or "id" not in rec:
                raise ValueError("not a record")
        except ValueError:
            if k == nonempty[-1]:
                torn = True  # the tail of an interrupted write
                break
            raise ValueError(f"{path}:{k + 1}: corrupt search record (not the last line)") from None
        records.append(rec)
    return records, torn or (text != "" and not text.endswith("\n"))


def read_records(path: str | os.PathLike) -> list[dict]:
    """Records of a search JSONL file (none if it does not exist); a torn last line is ignored."""
    path = Path(path)
    if not path.is_file():
        return []
    return _parse_lines(path.read_text(encoding="utf-8"), path)[0]


def _write_atomic(path: Path, records: Iterable[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _repair(path: Path) -> list[dict]:
    """Finished records of ``path``; rewrites the file atomically first when its tail is torn."""
    if not path.is_file():
        return []
    records, needs_repair = _parse_lines(path.read_text(encoding="utf-8"), path)
    if needs_repair:
        _write_atomic(path, records)
    return records


def _append(f, record: dict) -> None:
    f.write(json.dumps(record) + "\n")
    f.flush()
    os.fsync(f.fileno())


def shard_path(out_path: str | os.PathLike, index: int, count: int) -> Path:
    """``paths.jsonl`` -> ``paths.shard0-of-4.jsonl``."""
    out = Path(out_path)
    return out.with_name(f"{out.stem}.shard{index}-of-{count}{out.suffix or '.jsonl'}")


def shard_examples(examples: Sequence[Example], shard: tuple[int, int] | None) -> list[Example]:
    if shard is None:
        return list(examples)
    index, count = shard
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"shard must be (i, n) with 0 <= i < n, got {shard}")
    return list(examples[index::count])


# -------------------------------------------------------------------- summary


def summarize(records: Sequence[dict], seconds: float | None = None) -> dict:
    """Figures over ``records``: accuracies, mean layers saved per forward pass (best path vs the
    default; 0 where there is no best path), improved fraction (default wrong, a correct path found),
    shorter fraction (a correct path shorter than the default found), evaluations per second."""
    n = len(records)
    if n == 0:
        return {"n": 0, "default_accuracy": 0.0, "best_accuracy": 0.0, "mean_layers_saved": 0.0,
                "improved_fraction": 0.0, "shorter_fraction": 0.0, "evaluations": 0,
                "evaluations_per_second": 0.0, "seconds": 0.0}
    saved = [r["num_blocks"] - r["best_length"] if r["best_path"] is not None else 0 for r in records]
    evals = sum(r["evaluations"] for r in records)
    secs = sum(r["seconds"] for r in records) if seconds is None else seconds
    return {
        "n": n,
        "num_blocks": records[0]["num_blocks"],
        "default_accuracy": sum(r["default_reward"] for r in records) / n,
        "best_accuracy": sum(r["best_reward"] for r in records) / n,
        "mean_layers_saved": sum(saved) / n,
        "improved_fraction": sum(1 for r in records if r["best_reward"] > r["default_reward"]) / n,
        "shorter_fraction": sum(1 for s, r in zip(saved, records) if r["best_reward"] and s > 0) / n,
        "mean_good_paths": sum(len(r["good_paths"]) for r in records) / n,
        "evaluations": evals,
        "evaluations_per_second": evals / secs if secs > 0 else 0.0,
        "seconds": secs,
    }


# ------------------------------------------------------------------------ run


def run_search(model: Any, tokenizer: Any, examples: Sequence[Example], out_path: str | os.PathLike, *,
               config: SearchConfig | None = None, reward: str = "loglik",
               shard: tuple[int, int] | None = None, progress: bool = True,
               settings: dict | None = None, overwrite: bool = False) -> dict:
    """Search every example (of ``shard`` ``(i, n)``: ``examples[i::n]``) and append its record to
    ``out_path``, skipping ids already there. Returns :func:`summarize` of this shard's records.

    ``settings``: more settings to record with the output (e.g. the split);
    an output made under other settings is refused unless ``overwrite``
    (which starts it over).
    """
    config = config or SearchConfig()
    if reward not in MODES:
        raise ValueError(f"reward must be one of {MODES}, got {reward!r}")
    mine = shard_examples(examples, shard)
    ids = [e.id for e in mine]
    if len(set(ids)) != len(ids):
        raise ValueError("example ids must be unique (records are keyed by id)")
    out = Path(out_path)
    with exclusive_lock(out):
        claim_output(out, search_settings(model, examples, config, reward, settings), overwrite)
        records = append_missing(out, mine, lambda ex: search_example(model, tokenizer, ex, config, reward),
                                 desc="search", progress=progress, figures=_progress_figures)
    return summarize([records[i] for i in ids if i in records])


def _progress_figures(records: Sequence[dict]) -> dict:
    s = summarize(records)
    return {"default": f"{s['default_accuracy']:.3f}", "best": f"{s['best_accuracy']:.3f}",
            "saved": f"{s['mean_layers_saved']:.2f}", "evals_s": f"{s['evaluations_per_second']:.1f}"}


def append_missing(out: Path, examples: Sequence[Example], make_record: Callable[[Example], dict], *,
                   desc: str, progress: bool,
                   figures: Callable[[list[dict]], dict] | None = None) -> dict[str, dict]:
    """Append ``make_record(example)`` to ``out`` for each example without a record there (a torn last
    line repaired first); returns every record of ``out`` by id. ``figures`` of the examples' records
    so far are shown on the progress bar."""
    records = {r["id"]: r for r in _repair(out)}
    todo = [e for e in examples if e.id not in records]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(examples), initial=len(examples) - len(todo), desc=desc, unit="ex", dynamic_ncols=True)
    try:
        with open(out, "a", encoding="utf-8") as f:
            for ex in todo:
                rec = make_record(ex)
                _append(f, rec)
                records[ex.id] = rec
                if bar is not None:
                    if figures is not None:
                        bar.set_postfix(figures([records[e.id] for e in examples if e.id in records]))
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return records


def merge_shards(shard_paths: Sequence[str | os.PathLike], out_path: str | os.PathLike,
                 ids: Sequence[str] | None = None) -> list[dict]:
    """Merge shard files into ``out_path`` (atomically). Records are deduplicated by id (first wins)
    and ordered as ``ids`` when given (ids missing from every shard are an error), else shard by shard.
    The shards must have been made with one search's settings, which ``out_path`` then records."""
    settings = _common_settings(shard_paths)
    merged: dict[str, dict] = {}
    for p in shard_paths:
        for rec in read_records(p):
            merged.setdefault(rec["id"], rec)
    if ids is not None:
        missing = [i for i in ids if i not in merged]
        if missing:
            raise ValueError(f"{len(missing)} ids have no record in the shards (first: {missing[0]!r})")
        records = [merged[i] for i in ids]
    else:
        records = list(merged.values())
    out = Path(out_path)
    with exclusive_lock(out):
        _write_atomic(out, records)
        if settings is None:
            settings_path(out).unlink(missing_ok=True)
        else:
            write_json(settings_path(out), settings)
    return records


def _common_settings(shard_paths: Sequence[str | os.PathLike]) -> dict | None:
    """The settings all shards were made with (None for shards of an older drllm, which kept none)."""
    first, *rest = [(p, read_settings(p)) for p in shard_paths]
    for path, settings in rest:
        if settings != first[1]:
            raise ArtifactError(
                f"{path} was made with other settings than {first[0]} "
                f"({'; '.join(settings_diff(first[1] or {}, settings or {}))}); merge the shards of one search only"
            )
    return first[1]


def wait_for_shards(expected: dict[str, Sequence[str]], timeout: float | None = None, poll: float = 5.0) -> None:
    """Block until each shard file (key) holds a record for each of its ids (value)."""
    start = time.monotonic()
    while True:
        pending = [p for p, want in expected.items() if not set(want) <= {r["id"] for r in read_records(p)}]
        if not pending:
            return
        if timeout is not None and time.monotonic() - start > timeout:
            raise TimeoutError(f"shards not finished after {timeout:.0f} s: {', '.join(map(str, pending))}")
        time.sleep(poll)
