"""Path search: batched path evaluation with prefix reuse, and length-aware MCTS.

>>> from drllm.search import PathEvaluator, mcts_search, MCTSConfig
>>> ev = PathEvaluator(model, tokenizer, example)                         # doctest: +SKIP
>>> res = mcts_search(ev.evaluate, ev.num_blocks, MCTSConfig(seed=0))     # doctest: +SKIP
>>> res.best.path, res.best.length, [g.path for g in res.good]           # doctest: +SKIP
"""

from .evaluator import MODES, PathEvaluator, PathResult
from .mcts import MCTSConfig, SearchResult, actions, apply_action, is_valid_path, mcts_search, rank_key
from .run import SearchConfig, merge_shards, read_records, run_search, search_example, shard_path, summarize
from .skips import block_gains, probe_skips, shared_skip, skip_loses, single_skip_paths

__all__ = [
    "MODES",
    "PathEvaluator",
    "PathResult",
    "MCTSConfig",
    "SearchResult",
    "actions",
    "apply_action",
    "is_valid_path",
    "mcts_search",
    "rank_key",
    "SearchConfig",
    "run_search",
    "search_example",
    "merge_shards",
    "read_records",
    "shard_path",
    "summarize",
    "probe_skips",
    "single_skip_paths",
    "skip_loses",
    "block_gains",
    "shared_skip",
]
