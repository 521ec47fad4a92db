"""Budget routers (PuDDing-style): one router reads the prompt once and picks each row's whole skip set.

Why: routers moved by lambda pay more in accuracy than a static skip set of the
same size saves, and their compute is only known after the fact. With a budget
K every row skips exactly K blocks (L - K block passes, no repeats), so the
routers compete with ``static:K`` at equal compute; they only choose WHICH K.
The router reads the hidden state entering block ``tap`` (blocks before it
always execute) and predicts a damage per candidate: per block (head
``blocks``) or per skip set of a fixed vocabulary (head ``sets``); the least
damaging choice wins, under the skip-run limit the search and the baselines
keep.
"""

from __future__ import annotations

import os
import reprlib
from pathlib import Path

import torch
from torch import nn

from .. import ops
from ..artifacts import load_tensors
from .decide import check_max_skip_run
from .routers import (RouterCheckpoint, RouterFileError, RouterMLP, check_fields, check_parameters, fix_hint,
                      mlp_layout, read_config)

CONFIG_NAME = "drllm_budget_routers.json"
WEIGHTS_NAME = "budget_routers.safetensors"
HEADS = ("blocks", "sets")
MAX_SETS = 4096  # vocabulary sets over all budgets: far above any use, low enough to refuse a lying file early
OPTIONAL = ("tap", "head", "sets", "max_skip_run")


def longest_skip_run(skips) -> int:
    """The longest run of consecutive block indices in ``skips``."""
    longest, run, last = 0, 0, None
    for block in sorted(skips):
        run = run + 1 if last is not None and block == last + 1 else 1
        longest, last = max(longest, run), block
    return longest


def most_skips(blocks: int, max_skip_run: int | None) -> int:
    """The most blocks of ``blocks`` consecutive ones that can be skipped with at most ``max_skip_run`` in a row."""
    return blocks if max_skip_run is None else blocks - blocks // (max_skip_run + 1)


def greedy_skips(ranked: list[int], budget: int, tap: int, num_blocks: int, max_skip_run: int) -> list[int]:
    """``budget`` blocks taken from ``ranked`` (blocks >= tap, least damaging first) in that order, each unless
    it would make a run of more than ``max_skip_run`` skips or leave too few blocks to reach ``budget``.

    The plain greedy pass (no look-ahead) is tried first: when it reaches the
    budget it is the same set, since each block it took could be completed.
    """
    for lookahead in (False, True):
        skipped = [False] * num_blocks
        taken = []
        for block in ranked:
            skipped[block] = True
            if _run_through(skipped, block, tap) <= max_skip_run and (
                    not lookahead or _most_skips(skipped, tap, max_skip_run) >= budget):
                taken.append(block)
                if len(taken) == budget:
                    return taken
            else:
                skipped[block] = False
    raise ValueError(f"no {budget} blocks from {tap} on can be skipped with at most {max_skip_run} in a row")


def _run_through(skipped: list[bool], block: int, tap: int) -> int:
    """The length of the run of skipped blocks through ``block`` (blocks before ``tap`` always execute)."""
    start, end = block, block
    while start - 1 >= tap and skipped[start - 1]:
        start -= 1
    while end + 1 < len(skipped) and skipped[end + 1]:
        end += 1
    return end - start + 1


def _most_skips(forced: list[bool], tap: int, max_skip_run: int) -> int:
    """The most blocks >= tap that can be skipped, the ``forced`` ones among them, with at most ``max_skip_run``
    in a row (-1 when none can). Dynamic programme over the length of the current run."""
    best = [0] + [-1] * max_skip_run  # best[r]: most skips so far, ending in a run of r skips
    for block in range(tap, len(forced)):
        skip = [-1] + [b + 1 if b >= 0 else -1 for b in best[:-1]]
        best = skip if forced[block] else [max(best)] + skip[1:]
    return max(best)


def _budget_key(key) -> int:
    """A vocabulary key: a budget K >= 1, as an int or (from JSON) its decimal string."""
    if type(key) is str and key.isascii() and key.isdigit() and key == str(int(key)) and len(key) <= 4:
        key = int(key)
    if type(key) is not int or key < 1:
        raise ValueError(f"sets keys must be budgets K >= 1 (K = 0 needs no set), got {reprlib.repr(key)}")
    return key


def check_sets(sets, head: str, tap: int, num_blocks: int, max_skip_run: int | None) -> dict:
    """The vocabulary ``{K: ((block, ...), ...)}`` of head ``sets`` (sorted by K), checked: each set a sorted list
    of K distinct blocks in [tap, L) within the skip-run limit, no duplicates, at most :data:`MAX_SETS` in all.
    Head ``blocks`` takes none. Raises ValueError."""
    if head == "blocks":
        if sets:
            raise ValueError("sets are the vocabulary of head 'sets'; head 'blocks' scores every block")
        return {}
    if not isinstance(sets, dict) or not sets:
        raise ValueError("head 'sets' needs sets: {K: [[block, ...], ...]}, a non-empty vocabulary per budget K")
    out, total = {}, 0
    for key, listed in sets.items():
        k = _budget_key(key)
        if k >= num_blocks:
            raise ValueError(f"sets[{k}]: a budget must leave at least one of the {num_blocks} blocks")
        if k in out:
            raise ValueError(f"sets list budget {k} twice")
        if not isinstance(listed, (list, tuple)) or not listed:
            raise ValueError(f"sets[{k}] must be a non-empty list of skip sets, got {type(listed).__name__}")
        total += len(listed)
        if total > MAX_SETS:
            raise ValueError(f"sets hold more than {MAX_SETS} skip sets in all")
        for s in listed:
            if (not isinstance(s, (list, tuple)) or len(s) != k or any(type(b) is not int for b in s)
                    or list(s) != sorted(set(s)) or s[0] < tap or s[-1] >= num_blocks):
                raise ValueError(f"sets[{k}] holds {reprlib.repr(s)}: each must be a sorted list of {k} distinct "
                                 f"blocks in [{tap}, {num_blocks})")
            if max_skip_run is not None and longest_skip_run(s) > max_skip_run:
                raise ValueError(f"sets[{k}] holds {list(s)}, more than max_skip_run {max_skip_run} consecutive skips")
        if len(set(map(tuple, listed))) != len(listed):
            raise ValueError(f"sets[{k}] lists a skip set twice")
        out[k] = tuple(tuple(s) for s in listed)
    return dict(sorted(out.items()))


class BudgetRouters(RouterCheckpoint, nn.Module):
    """One router MLP over the hidden state entering block ``tap``: a predicted damage per block (head
    ``blocks``, ``L`` outputs) or per vocabulary skip set (head ``sets``, one output per set, sets ordered by K
    then as listed). :meth:`pick` turns the predictions into paths that skip exactly K blocks.

    The config records the base model's ``model_type``, hidden size and block
    count so that a checkpoint is never applied to another model (:meth:`check_compatible`);
    :meth:`save_pretrained` writes ``budget_routers.safetensors`` and ``drllm_budget_routers.json``.
    """

    weights_name, config_name = WEIGHTS_NAME, CONFIG_NAME
    config_keys = ("model_type", "hidden_size", "num_blocks", "tap", "head", "num_windows", "hidden", "max_skip_run")

    def __init__(self, model_type: str, hidden_size: int, num_blocks: int, tap: int = 0, head: str = "blocks",
                 num_windows: int = 8, hidden: int = 128, sets: dict | None = None, max_skip_run: int | None = 2):
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"unknown head {reprlib.repr(head)}; expected one of {HEADS}")
        if type(tap) is not int or not 0 <= tap < num_blocks:
            raise ValueError(f"tap must be a block in [0, {num_blocks}), got {reprlib.repr(tap)}")
        if num_windows < 1:
            raise ValueError(f"num_windows must be >= 1, got {num_windows}")
        self.max_skip_run = check_max_skip_run(max_skip_run)
        self.sets = check_sets(sets, head, tap, num_blocks, max_skip_run)
        self.model_type, self.hidden_size, self.num_blocks = model_type, hidden_size, num_blocks
        self.tap, self.head, self.num_windows, self.hidden = tap, head, num_windows, hidden
        self.mlp = RouterMLP(hidden_size, hidden, self.num_outputs)

    @property
    def num_outputs(self) -> int:
        return self.num_blocks if self.head == "blocks" else sum(map(len, self.sets.values()))

    @property
    def config(self) -> dict:
        return {**super().config, "sets": {str(k): [list(s) for s in v] for k, v in self.sets.items()}}

    def scores(self, hidden_states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Predicted damages ``[B, num_outputs]`` (float32) from the hidden state entering ``tap``, pooled over
        ``mask`` by the per-block routers' windowed mean."""
        mlp = self.mlp
        device = mlp.fc1.weight.device
        return ops.pooled_router_logits(hidden_states.to(device), mask.to(device), self.num_windows,
                                        mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias)

    def most_skips(self) -> int:
        """The largest budget head ``blocks`` serves: blocks >= tap under the skip-run limit, leaving one block."""
        return min(most_skips(self.num_blocks - self.tap, self.max_skip_run), self.num_blocks - 1)

    def budgets(self) -> str:
        """The budgets these routers serve, in words."""
        if self.head == "sets":
            return f"K in {[0, *self.sets]} (their vocabulary)"
        blocks = f"blocks {self.tap} to {self.num_blocks - 1}, max_skip_run {self.max_skip_run}"
        return f"K from 0 to {self.most_skips()} ({blocks})"

    def check_budget(self, budget) -> int:
        """``budget`` if these routers can serve it, else a ValueError naming what they serve."""
        if isinstance(budget, bool) or not isinstance(budget, int) or budget < 0:
            raise ValueError(f"budget must be the number of blocks each row skips, an integer >= 0, got {budget!r}")
        serves = budget in self.sets if self.head == "sets" else budget <= self.most_skips()
        if budget and not serves:
            raise ValueError(f"these budget routers cannot skip {budget} blocks per row: they serve {self.budgets()}")
        return budget

    def pick(self, scores: torch.Tensor, budget: int) -> torch.Tensor:
        """Each row's path ``[B, L]`` (int64, CPU; 0 skip, 1 execute) skipping exactly ``budget`` blocks.

        Head ``blocks``: the blocks >= tap in order of least predicted damage,
        each taken unless it would make more than ``max_skip_run``
        consecutive skips or leave too few blocks to reach the budget (the
        lexicographically least damaging allowed set). Head ``sets``: the
        vocabulary set of size ``budget`` with the least predicted damage.
        """
        budget = self.check_budget(budget)
        if scores.dim() != 2 or scores.shape[1] != self.num_outputs:
            raise ValueError(f"scores must be [batch, {self.num_outputs}], got {tuple(scores.shape)}")
        scores = scores.detach().float().cpu()
        paths = torch.ones(scores.shape[0], self.num_blocks, dtype=torch.int64)
        if budget == 0:
            return paths
        if self.head == "sets":
            offset = sum(len(v) for k, v in self.sets.items() if k < budget)
            vocabulary = self.sets[budget]
            table = torch.ones(len(vocabulary), self.num_blocks, dtype=torch.int64)
            for j, skips in enumerate(vocabulary):
                table[j, list(skips)] = 0
            return table[scores[:, offset : offset + len(vocabulary)].argmin(dim=1)]
        order = scores[:, self.tap :].argsort(dim=1, stable=True) + self.tap
        if self.max_skip_run is None or budget <= self.max_skip_run:  # no K-set can break the limit
            return paths.scatter_(1, order[:, :budget], 0)
        for row, ranked in zip(paths, order.tolist()):
            row[greedy_skips(ranked, budget, self.tap, self.num_blocks, self.max_skip_run)] = 0
        return paths

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, device: str | torch.device = "cpu") -> "BudgetRouters":
        """Budget routers saved by :meth:`save_pretrained`, checked before use as
        :meth:`drllm.Routers.from_pretrained` checks its files (config schema and bounds, tap, head, vocabulary,
        then the weights' header, then finite values). Raises :class:`RouterFileError` naming the file, the
        problem and the fix."""
        directory = Path(directory)
        config_file, weights = directory / CONFIG_NAME, directory / WEIGHTS_NAME
        fix = fix_hint(directory, "BudgetRouters")
        config = check_fields(read_config(config_file, WEIGHTS_NAME, fix, "BudgetRouters"), config_file, fix, OPTIONAL)
        try:
            with torch.device("meta"):  # built without memory: the parameter count is checked before any allocation
                routers = cls(**config)
        except ValueError as err:
            raise RouterFileError(f"{config_file}: {err}; {fix}") from None
        check_parameters(sum(p.numel() for p in routers.parameters()), config_file, fix)
        state = load_tensors(weights, mlp_layout("mlp.", routers.hidden_size, routers.hidden, routers.num_outputs),
                             fix, RouterFileError)
        routers.load_state_dict(state, assign=True)
        return routers.to(device)
