"""Search records as training reads them: validated paths, one record per id, and the prompt's tokens.

Training reads the search's JSONL file and nothing of the search's code: a
record carries the token ids routers pool over (``routing_tokens``) and the
item itself (``example``, to score it when knobs are chosen on the dev part).
Records of an older drllm lack both; their tokens are encoded from the
record's ``prompt`` by :func:`drllm.tasks.encode_prompt`, as the search
encoded them, and they cannot be scored unless the caller supplies the items.
"""

from __future__ import annotations

import json
import os
import warnings
from typing import Any, Mapping

from ..paths import path_from_str
from ..tasks import Example, encode_prompt

__all__ = ["read_path_records", "read_probes", "record_tokens", "record_example"]


def read_path_records(paths_file: str | os.PathLike, num_blocks: int | None = None) -> list[dict]:
    """Records of a search JSONL file, checked: a non-empty ``prompt``, an integer ``num_blocks``, every
    path valid and (with ``num_blocks``) of that length.

    A repeated id keeps its first record, with a warning: a copy would count
    twice and could land in both the train and the dev part.
    """
    records = []
    with open(paths_file) as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{paths_file}:{line_no}: not JSON ({err})") from None
            _check_record(rec, f"{paths_file}:{line_no}", num_blocks)
            records.append(rec)
    return _first_of_each_id(records, paths_file)


def _check_record(rec: Any, where: str, num_blocks: int | None) -> None:
    if not isinstance(rec, dict) or not isinstance(rec.get("prompt"), str) or not rec["prompt"]:
        raise ValueError(f"{where}: record without a non-empty 'prompt'")
    paths = [rec.get("best_path")] + [g.get("path") for g in rec.get("good_paths") or []]
    for path in (p for p in paths if p is not None):
        try:
            path_from_str(path)
        except (ValueError, TypeError):
            raise ValueError(f"{where}: invalid path {path!r}") from None
        if num_blocks is not None and len(path) != num_blocks:
            raise ValueError(f"{where}: a path has {len(path)} decisions but the model has {num_blocks} blocks "
                             "(were these paths searched on another model?)")
    if not isinstance(rec.get("num_blocks"), int):
        raise ValueError(f"{where}: record without an integer 'num_blocks'")
    tokens = rec.get("routing_tokens")
    if tokens is not None and (not isinstance(tokens, list) or not tokens
                               or not all(isinstance(t, int) and t >= 0 for t in tokens)):
        raise ValueError(f"{where}: 'routing_tokens' must be a non-empty list of token ids")


def _first_of_each_id(records: list[dict], source) -> list[dict]:
    kept, seen = [], set()
    for rec in records:
        if rec.get("id") not in seen:
            kept.append(rec)
            if rec.get("id") is not None:
                seen.add(rec["id"])
    if len(kept) < len(records):
        warnings.warn(f"{source}: {len(records) - len(kept)} records repeat an id already seen; "
                      "kept the first record of each id", stacklevel=3)
    return kept


def read_probes(skips_file: str | os.PathLike, num_blocks: int) -> dict[str, dict]:
    """Skip-probe records (:func:`drllm.search.probe_skips`) by id; a torn last line is ignored."""
    from ..search import read_records

    probes = {r["id"]: r for r in read_records(skips_file)}
    if any(r["num_blocks"] != num_blocks for r in probes.values()):
        raise ValueError(f"{skips_file}: skip probes of a model with another number of blocks than {num_blocks}")
    return probes


def record_tokens(record: Mapping, tokenizer: Any) -> list[int]:
    """The token ids routers pool over for ``record``: its ``routing_tokens``, else (an older record) its
    ``prompt`` encoded as the search scored it: a cloze context in log-likelihood mode, else a
    generation prompt (special tokens added unless it starts with the BOS text of a chat template)."""
    if record.get("routing_tokens") is not None:
        return list(record["routing_tokens"])
    prompt = record["prompt"]
    if record.get("reward_mode") in (None, "loglik"):
        return encode_prompt(tokenizer, prompt, cloze=True)
    bos = getattr(tokenizer, "bos_token", None)
    return encode_prompt(tokenizer, prompt, add_special_tokens=not (bos and prompt.startswith(bos)))


def record_example(record: Mapping, examples: Mapping[str, Example] | None = None) -> Example:
    """The item a record was searched on: its ``example`` field, else ``examples[id]``."""
    fields = record.get("example")
    if fields is not None:
        return Example(**{**fields, "choices": tuple(fields.get("choices") or ()),
                          "labels": tuple(fields.get("labels") or ())})
    if examples is not None and record.get("id") in examples:
        return examples[record["id"]]
    raise ValueError(
        f"search record {record.get('id')!r} carries no 'example' (written by an older drllm search), so the dev "
        "part cannot be scored: search again into a new file, or fix every knob (one --min-margin, one --lam)"
    )
