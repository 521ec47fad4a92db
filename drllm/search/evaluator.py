"""Scoring candidate paths on one example, many paths per batched call.

:class:`PathEvaluator` holds one example and answers ``evaluate(paths)`` with a
:class:`PathResult` per path (reward 0/1, margin, length). Results are
memoised by path, so a path is run at most once per example.

Log-likelihood mode (``mode="loglik"``, ARC): each choice is scored as
``context + choice`` (lm-eval-harness cloze, acc_norm, same tokenization as
:func:`drllm.tasks.score_choices`). With ``pack=True`` (default) the choices
of one path share one sequence ``context + choice_1 + ... + choice_C`` with a
4D attention mask (each choice sees the context and itself; positions restart
after the context), so the context runs once per path instead of once per
choice; ``pack=False`` uses one right-padded row per choice. The default path
runs once, recording the hidden state entering every block
(:func:`drllm.block_states` semantics). A batched call then holds one row
(packed) or ``choices`` rows per candidate; with ``prefix=True`` each row
starts at its path's first edited block from the stored state
(``drllm.forced_paths(..., prefix=)``), so the blocks before it are never
recomputed. Only the continuation positions go through the LM head.

Generation mode (``mode="generate"``): the prompt is repeated once per
candidate path, greedy ``generate`` runs on the batch (each row on its own
path, routed KV cache) and the answer is extracted and checked.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from ..runtime.control import forced_paths, observe
from ..paths import as_paths, default_path, path_from_str, path_to_str
from ..runtime.adapters import describe
from ..tasks import Example, choice_scores_from_loglikelihoods, cloze_requests, encode_request, generate_answers
from ..tasks.prompts import generation_prompt

__all__ = ["PathResult", "PathEvaluator", "MODES"]

MODES = ("loglik", "generate")


@dataclass(frozen=True)
class PathResult:
    """Outcome of one path on one example. ``margin`` (log-likelihood mode
    only) is the gold choice's normalised score minus the best wrong one's;
    ``reward`` is 1 when the answer is correct (log-likelihood mode: by a
    margin of at least the evaluator's ``min_margin``). ``scores``
    (log-likelihood mode only) are the normalised per-choice scores, so a
    caller can compare answer distributions (:mod:`drllm.train.damage`);
    search records leave them out."""

    path: str
    reward: int
    margin: float | None
    length: int
    prediction: str | None = None
    scores: tuple[float, ...] | None = None

    def as_record(self) -> dict:
        return {"path": self.path, "reward": self.reward, "margin": self.margin, "length": self.length}


def _key(path) -> str:
    return path if isinstance(path, str) else path_to_str(path)


class PathEvaluator:
    """Evaluate execution paths of ``model`` on one ``example``.

    ``max_paths`` candidate paths go in one batched call (at most
    ``max_rows`` rows in log-likelihood mode). ``prefix=False`` runs every
    row through all blocks (the reference the prefix reuse is tested
    against). ``evaluations`` counts paths actually run on the model,
    ``calls`` the batched calls; memo hits count in neither.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        example: Example,
        *,
        mode: str = "loglik",
        prefix: bool = True,
        pack: bool = True,
        max_paths: int = 8,
        max_rows: int = 64,
        style: str | None = None,
        normalize: str = "chars",
        max_new_tokens: int = 32,
        min_margin: float = 0.0,
    ):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if max_paths < 1 or max_rows < 1:
            raise ValueError("max_paths and max_rows must be >= 1")
        self.model, self.tokenizer, self.example = model, tokenizer, example
        self.mode, self.prefix, self.pack = mode, prefix, pack
        self.max_paths, self.max_rows = max_paths, max_rows
        self.normalize, self.max_new_tokens = normalize, max_new_tokens
        if min_margin < 0:
            raise ValueError(f"min_margin must be >= 0, got {min_margin}")
        self.min_margin = min_margin
        info = describe(model)
        self.num_blocks = info.num_blocks
        self.device = info.device
        self.memo: dict[str, PathResult] = {}
        self.evaluations = 0
        self.calls = 0
        if mode == "loglik":
            if not example.choices or example.gold_index is None:
                raise ValueError(f"log-likelihood rewards need a multiple-choice example, got task {example.task!r}")
            self.style = style or "plain"
            self.context, continuations = cloze_requests(example, tokenizer, style=self.style)
            self._prepare_rows(continuations)
        else:
            self.style = style or "auto"
            self.context = generation_prompt(example, tokenizer, style=self.style)
        self.default = self.evaluate([default_path(self.num_blocks)])[0]

    # ------------------------------------------------------------------ public

    @property
    def prompt(self) -> str:
        """The routing context: the cloze context, or the generation prompt."""
        return self.context

    def evaluate(self, paths: Sequence) -> list[PathResult]:
        """One result per path (``[L]`` tensors, lists or strings), memoised."""
        keys = [_key(p) for p in paths]
        todo = list(dict.fromkeys(k for k in keys if k not in self.memo))
        for start in range(0, len(todo), self._paths_per_call()):
            chunk = todo[start : start + self._paths_per_call()]
            tensor = as_paths(torch.stack([path_from_str(k) for k in chunk]), self.num_blocks)
            results = self._run_loglik(tensor) if self.mode == "loglik" else self._run_generate(tensor)
            for k, r in zip(chunk, results):
                self.memo[k] = r
            self.evaluations += len(chunk)
        return [self.memo[k] for k in keys]

    # ------------------------------------------------------------ log-likelihood

    def _paths_per_call(self) -> int:
        if self.mode == "loglik":
            return max(1, min(self.max_paths, self.max_rows // self.rows_per_path))
        return self.max_paths

    def _prepare_rows(self, continuations: list[str]) -> None:
        """Token layout of the choices. Packed (default): one sequence ``context + cont_1[:-1] + ... +
        cont_C[:-1]`` whose segment i sees the context and itself only (4D mask, positions restarting
        after the context), so the context runs once per path instead of once per choice. Unpacked:
        one right-padded row ``context + cont_i[:-1]`` per choice, as lm-eval-harness runs them."""
        encoded = [encode_request(self.tokenizer, self.context, cont) for cont in continuations]
        ctx = encoded[0][0]
        if any(e[0] != ctx for e in encoded):  # cannot happen with one context, but keep rows honest
            self.pack = False
        self.token_counts = [len(e[1]) for e in encoded]
        C = len(encoded)
        positions, targets, owner = [], [], []
        if self.pack:
            n = len(ctx)
            ids = list(ctx)
            pos = list(range(n))
            segment = [-1] * n
            for c, (_, toks) in enumerate(encoded):
                start = len(ids)
                ids += toks[:-1]
                pos += list(range(n, n + len(toks) - 1))
                segment += [c] * (len(toks) - 1)
                # token 0 is predicted from the last context token, token j from the segment's token j - 1
                positions += [n - 1] + [start + j for j in range(len(toks) - 1)]
                targets += toks
                owner += [c] * len(toks)
            T = len(ids)
            seg = torch.tensor(segment)
            causal = torch.ones(T, T, dtype=torch.bool).tril()
            visible = (seg[None, :] == -1) | (seg[None, :] == seg[:, None])
            self.ids = torch.tensor([ids])
            self.mask = (causal & visible)[None, None]
            self.position_ids = torch.tensor([pos])
            self.rows_per_path, self.width = 1, T
        else:
            pad = self.tokenizer.pad_token_id
            if pad is None:
                pad = self.tokenizer.eos_token_id or 0
            inputs = [((c + t)[:-1], len(c), t) for c, t in encoded]
            width = max(len(r[0]) for r in inputs)
            self.ids = torch.full((C, width), int(pad), dtype=torch.long)
            self.mask = torch.zeros((C, width), dtype=torch.long)
            for c, (inp, n_ctx, toks) in enumerate(inputs):
                self.ids[c, : len(inp)] = torch.tensor(inp)
                self.mask[c, : len(inp)] = 1
                positions += [c * width + n_ctx - 1 + j for j in range(len(toks))]
                targets += toks
                owner += [c] * len(toks)
            self.position_ids = None
            self.rows_per_path, self.width = C, width
        self.positions = torch.tensor(positions)
        self.targets = torch.tensor(targets)
        self.owner = torch.tensor(owner)
        if self.normalize == "chars":
            self.lengths = [float(len(c)) for c in self.example.choices]
        elif self.normalize == "bytes":
            self.lengths = [float(len(c.encode("utf-8"))) for c in self.example.choices]
        elif self.normalize == "tokens":
            self.lengths = [float(n) for n in self.token_counts]
        elif self.normalize == "none":
            self.lengths = [1.0] * C
        else:
            raise ValueError(f"normalize must be 'chars', 'bytes', 'tokens' or 'none', got {self.normalize!r}")
        self.ids, self.mask = self.ids.to(self.device), self.mask.to(self.device)
        if self.position_ids is not None:
            self.position_ids = self.position_ids.to(self.device)
        self.states = None

    def _inputs(self, n: int) -> dict:
        """Model inputs for ``n`` paths (rows = paths x rows_per_path)."""
        if self.pack:
            return dict(input_ids=self.ids.expand(n, -1), attention_mask=self.mask.expand(n, -1, -1, -1),
                        position_ids=self.position_ids.expand(n, -1))
        return dict(input_ids=self.ids.repeat(n, 1), attention_mask=self.mask.repeat(n, 1))

    def _scores(self, hidden: torch.Tensor, n_paths: int) -> list[tuple[float, ...]]:
        """Summed continuation log-probs per (path, choice) from final hidden states ``[n*C, T, H]``."""
        C, T = len(self.example.choices), self.width
        head = self.model.get_output_embeddings()
        offsets = (torch.arange(n_paths) * self.rows_per_path * T)[:, None]
        idx = (offsets + self.positions[None]).flatten().to(hidden.device)
        h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, idx)
        logp = head(h).float().log_softmax(-1)
        tgt = self.targets.repeat(n_paths).to(logp.device)
        tok = logp.gather(-1, tgt[:, None]).squeeze(-1).cpu().double()
        row = (torch.arange(n_paths)[:, None] * C + self.owner[None]).flatten()
        sums = torch.zeros(n_paths * C, dtype=torch.float64).index_add_(0, row, tok)
        return [tuple(float(x) for x in sums[p * C : (p + 1) * C]) for p in range(n_paths)]

    @torch.no_grad()
    def _run_loglik(self, paths: torch.Tensor) -> list[PathResult]:
        n, R = paths.shape[0], self.rows_per_path
        base = describe(self.model).base
        rows = paths.repeat_interleave(R, dim=0)
        if self.prefix and self.states is None:
            # first call: record the states entering each block on the default path
            states = [None] * self.num_blocks
            with forced_paths(self.model, default_path(self.num_blocks)), observe(self.model, states.__setitem__):
                default_hidden = base(**self._inputs(1), use_cache=False).last_hidden_state
            self.states = states
            self.calls += 1
            if bool((paths == 1).all()):
                return self._results(paths, self._scores(default_hidden, 1))
        if self.prefix:
            sources = torch.arange(R).repeat(n)
            ctx = forced_paths(self.model, rows, prefix=(self.states, sources))
        else:
            ctx = forced_paths(self.model, rows)
        with ctx:
            hidden = base(**self._inputs(n), use_cache=False).last_hidden_state
        self.calls += 1
        return self._results(paths, self._scores(hidden, n))

    def _results(self, paths: torch.Tensor, logprobs: list[tuple[float, ...]]) -> list[PathResult]:
        out = []
        for path, lps in zip(paths, logprobs):
            score = choice_scores_from_loglikelihoods(lps, self.example.gold_index, self.lengths)
            wins = score.correct and score.margin >= self.min_margin
            out.append(PathResult(path_to_str(path), int(wins), float(score.margin), int(path.sum()),
                                  self.example.labels[score.choice], score.normalized))
        return out

    # ---------------------------------------------------------------- generation

    @torch.no_grad()
    def _run_generate(self, paths: torch.Tensor) -> list[PathResult]:
        n = paths.shape[0]
        with forced_paths(self.model, paths):
            gens = generate_answers(
                self.model, self.tokenizer, [self.example] * n, prompts=[self.context] * n, batch_size=n,
                max_new_tokens=self.max_new_tokens, style=self.style,
            )
        self.calls += 1
        # all prompts have the same length, so generate_answers keeps row order: row r ran paths[r]
        return [PathResult(path_to_str(p), int(g.correct), None, int(p.sum()), g.prediction) for p, g in zip(paths, gens)]
