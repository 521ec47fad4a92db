"""Length-aware Monte Carlo Tree Search over skip / execute / repeat paths.

The tree's root is the default path (every block once). An action edits one
block that is still executed once: skip it, skip it and the next block, or
repeat it. A node's children are the valid paths one action away, so a node
at depth d differs from the default in d actions; selection descends through
internal nodes by

    UCB(child) = Q/N + c * sqrt(ln N_parent / N) - penalty * length / L

(with probability ``epsilon`` a uniformly random child instead), and a node
gains a new child while it has fewer than ``ceil(widen_c * N ** widen_alpha)``
children (progressive widening), so with a few dozen simulations the search
goes deep instead of only listing the root's ~3L edits.

Nodes are keyed by path: an action leading to a path already in the tree
links that node as a child (transpositions share one node, so the tree is a
DAG and no path is evaluated twice). One simulation = one selection that
ends by adding a new node, whose path is evaluated (so ``simulations`` new
paths are evaluated besides the default); its reward (1 correct / 0 wrong)
is backed up along the selection path. ``batch`` selections are made before evaluating (each selection counts
as a visit at once, the reward is added when known: a virtual loss that
spreads the batch over the tree), and their new paths are evaluated in one
batched call. Evaluations are memoised (a path reached through another order
of edits costs nothing). All random choices come from one seeded
``random.Random``: a search is reproducible.

Constraints, checked on every node: no more than ``max_skip_run`` (2)
consecutive skipped blocks, each block repeated at most once (decisions are
0/1/2), length <= ``length_cap`` (default 2L), never empty.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Callable, Sequence

from .evaluator import PathResult

__all__ = ["MCTSConfig", "SearchResult", "mcts_search", "is_valid_path", "actions", "apply_action", "rank_key"]

Evaluate = Callable[[Sequence[str]], list[PathResult]]


@dataclass
class MCTSConfig:
    simulations: int = 50
    c: float = 1.8
    penalty: float = 3.0
    epsilon: float = 0.1
    max_skip_run: int = 2
    length_cap: int | None = None  # default: 2L
    early_stop: bool = True
    batch: int = 8  # selections (new paths) per batched evaluation
    widen_c: float = 2.0
    widen_alpha: float = 0.5
    seed: int = 0


def skip_run_ok(path: str, max_skip_run: int = 2) -> bool:
    return "0" * (max_skip_run + 1) not in path


def is_valid_path(path: str, cap: int | None = None, max_skip_run: int = 2) -> bool:
    """Constraints of the search space (``cap`` defaults to 2L)."""
    if not path or any(ch not in "012" for ch in path):
        return False
    length = sum(int(ch) for ch in path)
    cap = 2 * len(path) if cap is None else cap
    return 0 < length <= cap and skip_run_ok(path, max_skip_run)


def actions(path: str) -> list[tuple[str, int]]:
    """Every edit of ``path`` (kind, block), before checking constraints:
    ``skip1`` / ``repeat`` on a block executed once, ``skip2`` on two
    consecutive blocks executed once."""
    ones = [i for i, ch in enumerate(path) if ch == "1"]
    out = [("skip1", i) for i in ones]
    out += [("skip2", i) for i in ones if i + 1 < len(path) and path[i + 1] == "1"]
    out += [("repeat", i) for i in ones]
    return out


def apply_action(path: str, action: tuple[str, int]) -> str:
    kind, i = action
    p = list(path)
    if kind == "skip1":
        p[i] = "0"
    elif kind == "skip2":
        p[i] = p[i + 1] = "0"
    elif kind == "repeat":
        p[i] = "2"
    else:
        raise ValueError(f"unknown action {kind!r}")
    return "".join(p)


def rank_key(r: PathResult):
    """Sort key, best first: correct, then shortest, then largest margin (then the path, for a total order)."""
    margin = r.margin if r.margin is not None else -math.inf
    return (-r.reward, r.length, -margin, r.path)


@dataclass(eq=False)
class _Node:
    path: str
    length: int
    untried: list = field(default_factory=list)
    children: list = field(default_factory=list)
    N: int = 0
    W: float = 0.0


@dataclass
class SearchResult:
    default: PathResult
    best: PathResult | None  # None when the default is wrong and nothing correct was found
    good: list[PathResult]  # correct paths, best first
    evaluated: list[PathResult]  # every distinct path evaluated, in order of first evaluation
    simulations: int
    stopped_early: bool
    tree_size: int
    max_depth: int


def mcts_search(evaluate: Evaluate, num_blocks: int, config: MCTSConfig | None = None,
                rng: random.Random | None = None) -> SearchResult:
    """Search paths of ``num_blocks`` decisions; ``evaluate(list of path strings)`` scores a batch."""
    cfg = config or MCTSConfig()
    rng = rng or random.Random(cfg.seed)
    L = num_blocks
    cap = 2 * L if cfg.length_cap is None else cfg.length_cap
    root_path = "1" * L
    if cap < L:
        raise ValueError(f"length_cap={cap} is below the default path's length {L}")

    seen: dict[str, PathResult] = {}
    order: list[str] = []

    def run(paths: list[str]) -> list[PathResult]:
        results = evaluate(paths)
        for p, r in zip(paths, results):
            if p not in seen:
                seen[p] = r
                order.append(p)
        return results

    def valid_actions(path: str) -> list:
        acts = []
        for a in actions(path):
            child = apply_action(path, a)
            if is_valid_path(child, cap, cfg.max_skip_run):
                acts.append(a)
        return acts

    default = run([root_path])[0]
    root = _Node(root_path, L, untried=valid_actions(root_path), N=1, W=float(default.reward))
    table = {root_path: root}  # one node per path: the tree shares transpositions (a DAG)
    tree_size, max_depth, sims, stopped = 1, 0, 0, False

    def can_widen(node: _Node) -> bool:
        if not node.untried:
            return False
        return len(node.children) < math.ceil(cfg.widen_c * node.N ** cfg.widen_alpha)

    def ucb(child: _Node, parent: _Node) -> float:
        return (child.W / child.N + cfg.c * math.sqrt(math.log(parent.N) / child.N)
                - cfg.penalty * child.length / L)

    def descend_or_expand(node: _Node) -> _Node | None:
        """Take an untried action of ``node``: a new node, or None when it leads to a path already in
        the tree (a transposition), which is linked as a child instead."""
        action = node.untried.pop(rng.randrange(len(node.untried)))
        child_path = apply_action(node.path, action)
        known = table.get(child_path)
        if known is not None:
            if known not in node.children:
                node.children.append(known)
            return None
        child = _Node(child_path, sum(int(ch) for ch in child_path), untried=valid_actions(child_path))
        table[child_path] = child
        node.children.append(child)
        return child

    def select() -> list[_Node] | None:
        """Descend from the root by UCB; return the selection path ending at a new node, or None when
        every valid path is already in the tree."""
        node, trail = root, [root]
        while True:
            widen = can_widen(node)
            live = [ch for ch in node.children if _has_frontier(ch)]
            if widen or (not live and node.untried):
                # add a child (past the widening bound when nothing is left below the children)
                child = descend_or_expand(node)
                if child is not None:
                    return trail + [child]
                continue  # a transposition was linked: choose again at this node
            if not live:
                if node is root:
                    return None
                # linking transpositions just used up this node's last actions: start again from the root
                node, trail = root, [root]
                continue
            if rng.random() < cfg.epsilon:
                node = live[rng.randrange(len(live))]
            else:
                parent = node
                node = max(live, key=lambda ch: ucb(ch, parent))
            trail.append(node)

    while sims < cfg.simulations and not stopped:
        trails = []
        for _ in range(min(cfg.batch, cfg.simulations - sims)):
            trail = select()
            if trail is None:
                break
            for n in trail:  # virtual visit: the reward is added once the batch is evaluated
                n.N += 1
            trails.append(trail)
            tree_size += 1
            max_depth = max(max_depth, len(trail) - 1)
        if not trails:
            break
        sims += len(trails)
        results = run([t[-1].path for t in trails])
        for trail, res in zip(trails, results):
            for n in trail:
                n.W += res.reward
            if cfg.early_stop and res.reward == 1 and res.length < L:
                stopped = True

    evaluated = [seen[p] for p in order]
    good = sorted((r for r in evaluated if r.reward == 1), key=rank_key)
    best = good[0] if good else None
    return SearchResult(default, best, good, evaluated, sims, stopped, tree_size, max_depth)


def _has_frontier(node: _Node) -> bool:
    """Whether an untried action is left somewhere below ``node`` (inclusive)."""
    stack, seen = [node], set()
    while stack:
        n = stack.pop()
        if n.untried:
            return True
        for ch in n.children:
            if id(ch) not in seen:
                seen.add(id(ch))
                stack.append(ch)
    return False
