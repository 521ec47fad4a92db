"""Running the search over a dataset: one JSONL record per example.

Records are appended one line at a time, flushed and fsynced; a reader
(:func:`read_records`) ignores a torn last line, and a resumed run first
rewrites the file without it (temp file + ``os.replace``), so an interrupted
run never corrupts finished records. A rerun skips the ids already in the
file. Every example's search is seeded from ``(config.seed, example id)``
alone, so records do not depend on the order, the sharding or on resuming.

Record fields: ``id``, ``task``, ``reward_mode``, ``prompt`` (the routing
context text: the cloze context in log-likelihood mode, the generation prompt
otherwise), ``gold``, ``num_blocks``, ``min_margin`` (log-likelihood mode:
how far the gold answer must lead for a path to win; null otherwise),
``default_reward``, ``default_margin``, ``best_path`` (``"1101..."``, or null
when the default path does not win and no winning path was found),
``best_reward``, ``best_margin``, ``best_length`` (null with a null
``best_path``), ``good_paths`` (winning paths, best first:
``{"path", "reward", "margin", "length"}``), ``evaluations``, ``simulations``,
``stopped_early``, ``seconds``.
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
from typing import Any, Iterable, Sequence

from ..tasks import Example
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
               shard: tuple[int, int] | None = None, progress: bool = True) -> dict:
    """Search every example (of ``shard`` ``(i, n)``: ``examples[i::n]``) and append its record to
    ``out_path``, skipping ids already there. Returns :func:`summarize` of this shard's records."""
    config = config or SearchConfig()
    if reward not in MODES:
        raise ValueError(f"reward must be one of {MODES}, got {reward!r}")
    mine = shard_examples(examples, shard)
    ids = [e.id for e in mine]
    if len(set(ids)) != len(ids):
        raise ValueError("example ids must be unique (records are keyed by id)")
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    existing = _repair(out)
    done = {r["id"]: r for r in existing}
    todo = [e for e in mine if e.id not in done]
    records = {i: done[i] for i in ids if i in done}

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(mine), initial=len(mine) - len(todo), desc="search", unit="ex", dynamic_ncols=True)
    try:
        with open(out, "a", encoding="utf-8") as f:
            for ex in todo:
                rec = search_example(model, tokenizer, ex, config, reward)
                _append(f, rec)
                records[ex.id] = rec
                if bar is not None:
                    s = summarize(list(records.values()))
                    bar.set_postfix(default=f"{s['default_accuracy']:.3f}", best=f"{s['best_accuracy']:.3f}",
                                    saved=f"{s['mean_layers_saved']:.2f}", evals_s=f"{s['evaluations_per_second']:.1f}")
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return summarize([records[i] for i in ids if i in records])


def merge_shards(shard_paths: Sequence[str | os.PathLike], out_path: str | os.PathLike,
                 ids: Sequence[str] | None = None) -> list[dict]:
    """Merge shard files into ``out_path`` (atomically). Records are deduplicated by id (first wins)
    and ordered as ``ids`` when given (ids missing from every shard are an error), else shard by shard."""
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
    _write_atomic(Path(out_path), records)
    return records


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
