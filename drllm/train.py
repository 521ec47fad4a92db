"""Router training from searched paths: teacher forcing on cached features.

The base model is frozen and execution is teacher-forced along each
example's labelled path (:func:`label_path`: the searched path to learn,
chosen from the search's JSONL), so the hidden
state entering every block along that path is a fixed function of the
example. Router ``i`` only ever sees it through the windowed means of the
prompt's tokens (:func:`drllm.ops.window_means`), so those means
``[L, num_windows, H]`` are computed once per example (one batched forward,
several prompts per forward, right padding, padding excluded from the
pooling), cached on disk, and the routers are trained on the cache:

- loss: focal loss (gamma 2) with effective-number class weights (beta 0.999)
  computed from the training labels of all blocks together;
- AdamW (lr 1e-3, weight decay 0.01), linear warmup then cosine decay, per step;
- a seeded validation split; per epoch, per-layer accuracy, per-class
  precision / recall / F1, macro F1 and mean predicted path length;
- a checkpoint per epoch (routers, optimizer, scheduler, history), written to a
  temporary folder renamed into place, so an interrupted run resumes from the
  last complete epoch and ends with exactly the routers of an uninterrupted run.
  It is safetensors (tensors) and JSON (the rest), never pickle, and every
  part is checked before it is loaded: an output folder may come from someone
  else, and unpickling a file runs any code it carries.

The router logits used in training are those of inference: for each block the
router MLP is applied to every valid window mean and the logits are averaged
(:func:`drllm.ops.pooled_router_logits_reference`), computed for all blocks
at once with batched matrix products.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from . import ops
from .artifacts import ArtifactError, exclusive_lock, load_tensors, model_fingerprint, read_json, write_json
from .batching import pad_batch
from .paths import path_from_str
from .routers import Routers
from .runtime.adapters import describe
from .search.run import read_records
from .search.skips import shared_skip, skip_loses, skip_paths

__all__ = [
    "TrainConfig",
    "train_routers",
    "label_path",
    "load_path_records",
    "extract_features",
    "class_weights",
    "focal_loss",
    "batched_router_logits",
    "classification_metrics",
    "CLASS_NAMES",
    "routing_tokens",
]

CLASS_NAMES = ("skip", "execute", "repeat")
CHECKPOINTS = "checkpoints"
STATE_TENSORS = "trainer_state.safetensors"  # optimizer moments
STATE_JSON = "trainer_state.json"  # epoch, history, signature, optimizer groups, scheduler
STATE_KEYS = {"epoch", "history", "signature", "param_groups", "scheduler"}
LEGACY_STATE = "trainer_state.pt"  # a pickle of older versions: never loaded
METRICS_NAME = "train_metrics.json"
CONFIG_NAME = "train_config.json"


@dataclass
class TrainConfig:
    """Hyper-parameters and bookkeeping of :func:`train_routers`.

    ``batch_size`` counts examples per optimisation step (each example gives
    one label per block). ``warmup_ratio`` is the fraction of all steps spent
    in the linear warmup; the cosine then decays to ``min_lr_ratio * lr``.
    ``extract_batch_size`` prompts go through the base model per forward.
    ``cache_dtype`` (``float16`` or ``float32``) is how the window means are
    stored; ``cache_dir`` defaults to ``<out_dir>/cache``. With ``resume``,
    a run whose ``out_dir`` holds a checkpoint of the same configuration and
    data continues from it; without, it starts over. ``limit`` keeps the
    first N records. ``min_margin``: a searched path is learned only if the
    gold answer wins by at least this much normalised log-likelihood
    (:func:`label_path`); 0 learns every correct path.
    """

    epochs: int = 25
    min_margin: float = 0.2
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_ratio: float = 0.05
    min_lr_ratio: float = 0.0
    gamma: float = 2.0
    beta: float = 0.999
    val_fraction: float = 0.1
    seed: int = 0
    num_windows: int = 8
    router_hidden: int = 128
    extract_batch_size: int = 16
    cache_dtype: str = "float16"
    cache_dir: str | None = None
    resume: bool = True
    progress: bool = True
    keep_checkpoints: int = 1
    limit: int | None = None
    device: str = "cpu"

    # fields that do not change the training trajectory (may differ on resume)
    _BOOKKEEPING = ("extract_batch_size", "cache_dir", "resume", "progress", "keep_checkpoints", "device")

    def __post_init__(self):
        if self.epochs < 1 or self.batch_size < 1 or self.extract_batch_size < 1:
            raise ValueError("epochs, batch_size and extract_batch_size must be >= 1")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.min_margin < 0:
            raise ValueError(f"min_margin must be >= 0, got {self.min_margin}")
        if not 0.0 <= self.beta < 1.0:
            raise ValueError(f"beta must be in [0, 1), got {self.beta}")
        if self.cache_dtype not in ("float16", "float32"):
            raise ValueError(f"cache_dtype must be 'float16' or 'float32', got {self.cache_dtype!r}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")

    def signature(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in self._BOOKKEEPING}


# --------------------------------------------------------------------------- data


def label_path(record: dict, min_margin: float = 0.0, shared: int | None = None, probe: dict | None = None) -> str:
    """The path a search record teaches: its best correct path that wins by ``min_margin``, else the
    shared skip, else the default.

    Candidates are the record's ``good_paths`` (and ``best_path``) whose gold
    answer beats every other choice by at least ``min_margin`` of normalised
    log-likelihood (generation records carry no margin and count every
    correct path); the shortest wins, then the widest margin. On a small model
    most answers are near ties, and a path that only just flips one teaches
    routers noise, which they then apply to inputs where it costs accuracy.

    A record with no such path teaches skipping block ``shared`` alone
    (:func:`drllm.search.shared_skip`) when its own skip ``probe``
    (:func:`drllm.search.probe_skips`) shows that skip not turning its right
    answer wrong; otherwise the default path (execute every block).
    """
    L = int(record["num_blocks"])
    found = list(record.get("good_paths") or [])
    if record.get("best_path") is not None:
        found.append({"path": record["best_path"], "margin": record.get("best_margin"),
                      "length": record.get("best_length")})
    wins = [g for g in found if g["margin"] is None or g["margin"] >= min_margin]
    if wins:
        best = min(wins, key=lambda g: (sum(map(int, g["path"])), -(g["margin"] or 0.0), g["path"]))
        return best["path"]
    if shared is not None and probe is not None and not skip_loses(probe, shared):
        return skip_paths(L)[shared]
    return "1" * L


def load_path_records(paths_file: str | os.PathLike, num_blocks: int | None = None,
                      min_margin: float = 0.0, shared: int | None = None,
                      probes: dict[str, dict] | None = None) -> list[dict]:
    """Records of a search JSONL file, each with its training ``label`` (:func:`label_path`; ``probes``
    maps ids to skip-probe records).

    Every path of a record must have one digit per block; a path of the wrong
    length for ``num_blocks`` is an error. A repeated id keeps its first
    record, with a warning: a copy would count twice and could land in both
    the training and the validation part.
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
            if not isinstance(rec.get("prompt"), str) or not rec["prompt"]:
                raise ValueError(f"{paths_file}:{line_no}: record without a non-empty 'prompt'")
            paths = [rec.get("best_path")] + [g.get("path") for g in rec.get("good_paths") or []]
            for path in (p for p in paths if p is not None):
                try:
                    path_from_str(path)
                except (ValueError, TypeError):
                    raise ValueError(f"{paths_file}:{line_no}: invalid path {path!r}") from None
                if num_blocks is not None and len(path) != num_blocks:
                    raise ValueError(
                        f"{paths_file}:{line_no}: a path has {len(path)} decisions but the model has "
                        f"{num_blocks} blocks (were these paths searched on another model?)"
                    )
            if not isinstance(rec.get("num_blocks"), int):
                raise ValueError(f"{paths_file}:{line_no}: record without an integer 'num_blocks'")
            probe = (probes or {}).get(rec.get("id"))
            records.append({**rec, "label": label_path(rec, min_margin, shared, probe)})
    return _first_of_each_id(records, paths_file)


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


def _feature_key(fingerprint: str, token_ids: Sequence[int], path: str, num_windows: int) -> str:
    payload = json.dumps([fingerprint, list(map(int, token_ids)), path, int(num_windows)])
    return hashlib.sha256(payload.encode()).hexdigest()[:40]


def routing_tokens(tokenizer: Any, prompt: str, reward_mode: str | None = None) -> list[int]:
    """The tokens routers pool over for a record's ``prompt``, encoded as evaluation encodes it.

    Log-likelihood (``reward_mode`` "loglik" or absent): the cloze context as
    :func:`drllm.tasks.encode_request` encodes it (trailing whitespace moved
    to the continuation, no special tokens; an empty context is the BOS/EOS
    token). Generation: as :func:`drllm.tasks.generate_answers` encodes a
    prompt (special tokens added unless the prompt already starts with the
    BOS text of a chat template).
    """
    if reward_mode in (None, "loglik"):
        text = prompt.rstrip()
        if not text:
            tid = next((getattr(tokenizer, n) for n in ("bos_token_id", "eos_token_id", "pad_token_id")
                        if getattr(tokenizer, n, None) is not None), None)
            if tid is None:
                raise ValueError("empty prompt and the tokenizer has no bos/eos/pad token to stand in for it")
            return [int(tid)]
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    bos = getattr(tokenizer, "bos_token", None)
    special = not (bos and prompt.startswith(bos))
    return list(tokenizer(prompt, add_special_tokens=special)["input_ids"])


class FeatureCache:
    """Window means on disk: shard files ``features-*.safetensors`` in one folder.

    Each example is stored under its key as ``<key>`` (``[L, W, H]``) and
    ``<key>.valid`` (``[W]``, uint8). Shards are written through a temporary
    file and a rename, so a crash never leaves half a shard.
    """

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.index: dict[str, Path] = {}
        from safetensors import safe_open

        for shard in sorted(self.directory.glob("features-*.safetensors")):
            try:
                with safe_open(str(shard), "pt") as f:
                    for k in f.keys():
                        if not k.endswith(".valid"):
                            self.index[k] = shard
            except Exception:  # a foreign or damaged file: ignore it, its examples are recomputed
                continue

    def __contains__(self, key: str) -> bool:
        return key in self.index

    def write(self, items: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        from safetensors.torch import save_file

        if not items:
            return
        tensors = {}
        for key, (means, valid) in items.items():
            tensors[key] = means.contiguous()
            tensors[key + ".valid"] = valid.to(torch.uint8).contiguous()
        name = hashlib.sha256("".join(sorted(items)).encode()).hexdigest()[:24]
        shard = self.directory / f"features-{name}.safetensors"
        tmp = self.directory / f".features-{name}.tmp"
        save_file(tensors, str(tmp))
        os.replace(tmp, shard)
        for key in items:
            self.index[key] = shard

    def load(self, keys: Sequence[str], dtype: torch.dtype, block_major: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Means ``[N, L, W, H]`` (``[L, N, W, H]`` with ``block_major``) in ``dtype`` and ``[N, W]`` validity."""
        from safetensors import safe_open

        if not keys:
            raise ValueError("no examples to load")
        by_shard: dict[Path, list[int]] = {}
        for i, k in enumerate(keys):
            by_shard.setdefault(self.index[k], []).append(i)
        means = valid = None
        for shard, idx in by_shard.items():
            with safe_open(str(shard), "pt") as f:
                for i in idx:
                    m = f.get_tensor(keys[i])
                    if means is None:
                        L, W, H = m.shape
                        shape = (L, len(keys), W, H) if block_major else (len(keys), L, W, H)
                        means = torch.empty(shape, dtype=dtype)
                        valid = torch.empty(len(keys), W, dtype=torch.bool)
                    if block_major:
                        means[:, i] = m
                    else:
                        means[i] = m
                    valid[i] = f.get_tensor(keys[i] + ".valid").to(torch.bool)
        return means, valid


@torch.no_grad()
def extract_features(
    model: torch.nn.Module,
    token_ids: Sequence[Sequence[int]],
    paths: torch.Tensor,
    num_windows: int,
    *,
    batch_size: int = 16,
    progress: Callable[[int], None] | None = None,
):
    """Window means of the hidden state entering every block along each row's path.

    ``token_ids[i]`` is prompt ``i`` and ``paths[i]`` its path (``[N, L]``).
    Prompts are sorted by length and run ``batch_size`` at a time, right
    padded (a real token never attends to padding), through the decoder
    blocks only (no LM head) under :func:`drllm.forced_paths`; the states
    entering each block come from :func:`drllm.observe` and are pooled at
    once. Yields ``(indices, means [B, L, W, H] float32, valid [B, W])``.
    """
    from .runtime.patch import forced_paths, observe

    info = describe(model)
    base = info.base
    L = info.num_blocks
    pad_id = getattr(getattr(model, "config", None), "pad_token_id", None) or 0
    order = sorted(range(len(token_ids)), key=lambda i: -len(token_ids[i]))
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        if any(not token_ids[i] for i in idx):
            raise ValueError("empty prompt: it encodes to no tokens")
        ids, mask = pad_batch([token_ids[i] for i in idx], pad_id)
        ids, mask = ids.to(info.device), mask.to(info.device)
        means = [None] * L
        valid = []

        def pool(block, hidden):
            m, v = ops.window_means(hidden, mask, num_windows)
            means[block] = m.cpu()
            if not valid:
                valid.append(v.cpu())

        with forced_paths(model, paths[idx]), observe(model, pool):
            base(input_ids=ids, attention_mask=mask, use_cache=False)
        if any(m is None for m in means):
            raise RuntimeError("the observer did not see every block: is the model patched by another tool?")
        yield idx, torch.stack(means, dim=1), valid[0]
        if progress is not None:
            progress(len(idx))


# --------------------------------------------------------------------------- loss and metrics


def class_weights(labels: torch.Tensor, beta: float = 0.999, num_classes: int = 3) -> torch.Tensor:
    """Effective-number class weights (Cui et al., 2019) of integer ``labels``.

    ``w_c = (1 - beta) / (1 - beta ** n_c)`` for a class seen ``n_c > 0``
    times, 0 for an unseen class; rescaled so the weights of the seen classes
    sum to their number (1 each when balanced).
    """
    counts = torch.bincount(labels.reshape(-1).long(), minlength=num_classes).double()
    w = torch.zeros(num_classes, dtype=torch.float64)
    seen = counts > 0
    w[seen] = (1.0 - beta) / (1.0 - beta ** counts[seen])
    if seen.any():
        w = w * (seen.sum() / w.sum())
    return w.float()


def focal_loss(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor | None = None, gamma: float = 2.0):
    """Mean over items of ``-w[y] * (1 - p_y) ** gamma * log p_y`` (``logits [M, C]``, ``targets [M]``)."""
    logp = F.log_softmax(logits.float(), dim=-1).gather(-1, targets.long()[:, None]).squeeze(-1)
    loss = -((1.0 - logp.exp()).clamp(min=0.0) ** gamma) * logp
    if weights is not None:
        loss = loss * weights.to(loss.device)[targets.long()]
    return loss.mean()


def _stacked(routers: Routers):
    m = routers.mlps
    w1 = torch.stack([r.fc1.weight for r in m])  # [L, h, H]
    b1 = torch.stack([r.fc1.bias for r in m])  # [L, h]
    w2 = torch.stack([r.fc2.weight for r in m])  # [L, 3, h]
    b2 = torch.stack([r.fc2.bias for r in m])  # [L, 3]
    return w1, b1, w2, b2


def batched_router_logits(routers: Routers, means: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Router logits ``[B, L, 3]`` of every block from window means ``[B, L, W, H]`` and validity ``[B, W]``.

    Equal to ``routers.logits(i, hidden, mask)`` for the hidden state whose
    window means these are (the mean of the MLP's logits over valid windows).
    """
    return _block_major_logits(routers, means.float().transpose(0, 1), valid).transpose(0, 1)


def _block_major_logits(routers: Routers, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Logits ``[L, B, 3]`` from float32 means ``[L, B, W, H]`` (contiguous: no copy) and ``[B, W]`` validity."""
    L, B, W, H = x.shape
    w1, b1, w2, b2 = _stacked(routers)
    h = F.gelu(torch.baddbmm(b1[:, None, :], x.reshape(L, B * W, H), w1.transpose(1, 2)), approximate="tanh")
    out = torch.baddbmm(b2[:, None, :], h, w2.transpose(1, 2)).reshape(L, B, W, 3)
    v = valid.to(out.dtype)[None, :, :, None]  # [1, B, W, 1]
    return (out * v).sum(dim=2) / v.sum(dim=2)


def classification_metrics(pred: torch.Tensor, labels: torch.Tensor, loss: float | None = None) -> dict:
    """Per-layer accuracy, per-class precision/recall/F1, macro F1, path lengths of ``[N, L]`` decisions.

    Macro F1 averages the classes that occur in the labels or the
    predictions; a class with no predictions has precision 0.
    """
    pred, labels = pred.long(), labels.long()
    per_layer = (pred == labels).float().mean(dim=0)
    per_class = {}
    f1s = []
    for c, name in enumerate(CLASS_NAMES):
        tp = int(((pred == c) & (labels == c)).sum())
        npred, support = int((pred == c).sum()), int((labels == c).sum())
        precision = tp / npred if npred else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[name] = {"precision": precision, "recall": recall, "f1": f1, "support": support, "predicted": npred}
        if support or npred:
            f1s.append(f1)
    out = {
        "accuracy": float((pred == labels).float().mean()),
        "per_layer_accuracy": [round(float(a), 6) for a in per_layer],
        "min_layer_accuracy": float(per_layer.min()),
        "per_class": per_class,
        "macro_f1": sum(f1s) / len(f1s) if f1s else 0.0,
        "mean_pred_length": float(pred.sum(dim=1).float().mean()),
        "mean_label_length": float(labels.sum(dim=1).float().mean()),
        "examples": int(labels.shape[0]),
    }
    if loss is not None:
        out["loss"] = loss
    return out


def _lr_lambda(total_steps: int, warmup_steps: int, min_ratio: float):
    def fn(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return fn


# --------------------------------------------------------------------------- checkpoints


def _checkpoint_dirs(out_dir: Path) -> list[tuple[int, Path]]:
    found = []
    root = out_dir / CHECKPOINTS
    if root.is_dir():
        for d in root.iterdir():
            if d.is_dir() and d.name.startswith("epoch-") and (d / STATE_JSON).is_file():
                try:
                    found.append((int(d.name[len("epoch-") :]), d))
                except ValueError:
                    pass
    return sorted(found)


def _refuse_legacy_state(out_dir: Path) -> None:
    """Refuse to resume next to a pickled trainer state of an older drllm, which is never loaded: unpickling
    a file from someone else runs any code it carries."""
    legacy = sorted((out_dir / CHECKPOINTS).glob(f"epoch-*/{LEGACY_STATE}"))
    if legacy:
        raise ArtifactError(
            f"{legacy[-1]}: a pickled trainer state (older drllm), never loaded because unpickling can run code; "
            f"delete {out_dir / CHECKPOINTS} or train into a fresh --out"
        )


def _optimizer_layout(optimizer: torch.optim.Optimizer) -> dict[str, tuple[tuple[int, ...], str]]:
    """The tensors AdamW holds after a step, as saved: ``optimizer.<param>.<step|exp_avg|exp_avg_sq>``."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    return {f"optimizer.{i}.{name}": (shape, "F32") for i, p in enumerate(params)
            for name, shape in (("step", ()), ("exp_avg", tuple(p.shape)), ("exp_avg_sq", tuple(p.shape)))}


def _save_trainer_state(directory: Path, optimizer, scheduler, info: dict) -> None:
    """Optimizer moments as safetensors, the rest (``info``, optimizer groups, scheduler) as JSON."""
    from safetensors.torch import save_file

    opt = optimizer.state_dict()
    tensors = {f"optimizer.{i}.{name}": t.detach().cpu().contiguous()
               for i, state in opt["state"].items() for name, t in state.items()}
    save_file(tensors, str(directory / STATE_TENSORS))
    write_json(directory / STATE_JSON, {**info, "param_groups": opt["param_groups"],
                                        "scheduler": scheduler.state_dict()})


def _save_checkpoint(out_dir: Path, epoch: int, routers: Routers, optimizer, scheduler, info: dict,
                     keep: int) -> Path:
    root = out_dir / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"epoch-{epoch:04d}"
    tmp = root / f".epoch-{epoch:04d}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    routers.save_pretrained(tmp)
    _save_trainer_state(tmp, optimizer, scheduler, info)
    if final.exists():  # a leftover of an earlier run being overwritten
        shutil.rmtree(final)
    os.replace(tmp, final)  # the folder appears complete, or not at all
    for _, old in _checkpoint_dirs(out_dir)[: -max(1, keep)]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _as_json(value):
    """``value`` as it reads back from a JSON file (tuples become lists)."""
    return json.loads(json.dumps(value))


def _without_lr(group) -> dict | None:
    return {k: v for k, v in group.items() if k != "lr"} if isinstance(group, dict) else None


def _state_problem(state, epoch: int, optimizer, scheduler) -> str | None:
    """What makes the JSON part of a trainer state unfit for this trainer, if anything: its keys, the epoch
    of its folder, optimizer groups other than this run's (but for the scheduled learning rate), a
    scheduler state of another shape."""
    groups = _as_json(optimizer.state_dict()["param_groups"])
    sched = _as_json(scheduler.state_dict())
    if not isinstance(state, dict) or set(state) != STATE_KEYS:
        return "not a trainer state (other keys)"
    if state["epoch"] != epoch or not isinstance(state["history"], list) or len(state["history"]) != epoch:
        return f"epoch or history does not match the folder's epoch {epoch}"
    saved = state["param_groups"] if isinstance(state["param_groups"], list) else []
    if [_without_lr(g) for g in saved] != [_without_lr(g) for g in groups] or not all(
            isinstance(g["lr"], float) for g in saved):
        return "optimizer settings differ from this run's"
    if not isinstance(state["scheduler"], dict) or set(state["scheduler"]) != set(sched) or any(
            type(state["scheduler"][k]) is not type(v) for k, v in sched.items()):
        return "scheduler state does not fit this run's scheduler"
    return None


def _resume(ckpt: Path, epoch: int, signature: dict, routers: Routers, optimizer, scheduler) -> list[dict]:
    """Load a checkpoint written by :func:`_save_checkpoint` into ``routers``, ``optimizer`` and ``scheduler``
    after checking every part of it; returns the history so far."""
    fix = f"delete {ckpt} to resume from the epoch before, or train into a fresh --out"
    path = ckpt / STATE_JSON
    state = read_json(path, fix)
    if isinstance(state, dict) and state.get("signature") != _as_json(signature):
        recorded = state.get("signature") if isinstance(state.get("signature"), dict) else {}
        changed = [k for k in signature if recorded.get(k) != _as_json(signature[k])]
        raise ArtifactError(
            f"{ckpt} was written by a run with another {' and '.join(changed)}; "
            "pass resume=False (drllm train --no-resume) to start over, or use another output folder"
        )
    problem = _state_problem(state, epoch, optimizer, scheduler)
    if problem:
        raise ArtifactError(f"{path}: {problem}; {fix}")
    tensors = load_tensors(ckpt / STATE_TENSORS, _optimizer_layout(optimizer), fix)
    moments: dict[int, dict] = {}
    for key, t in tensors.items():
        _, index, name = key.split(".")
        moments.setdefault(int(index), {})[name] = t
    routers.load_state_dict(Routers.from_pretrained(ckpt).state_dict())
    optimizer.load_state_dict({"state": moments, "param_groups": state["param_groups"]})
    scheduler.load_state_dict(state["scheduler"])
    return state["history"]


# --------------------------------------------------------------------------- training


def _split(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = int(round(n * val_fraction))
    if val_fraction > 0 and n >= 2:
        n_val = min(max(n_val, 1), n - 1)
    else:
        n_val = 0
    return sorted(perm[n_val:]), sorted(perm[:n_val])


def _tqdm(progress: bool, **kwargs):
    from tqdm.auto import tqdm

    return tqdm(disable=not progress, dynamic_ncols=True, **kwargs)


def train_routers(
    model: torch.nn.Module,
    tokenizer: Any,
    paths_file: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    config: TrainConfig | None = None,
    skips_file: str | os.PathLike | None = None,
    callback: Callable[[int, dict], None] | None = None,
) -> dict:
    """Train routers for ``model`` from the labelled paths in ``paths_file``; write them to ``out_dir``.

    Each record teaches :func:`label_path` with ``config.min_margin``; with ``skips_file`` (written by
    :func:`drllm.search.probe_skips`), records without a decisive path teach the skip of
    :func:`drllm.search.shared_skip` of those probes where their own probe allows. Features are read from
    (or added to) the cache, then ``config.epochs`` epochs run on it. After
    each epoch a checkpoint is written and ``callback(epoch, metrics)`` is
    called (1-based epoch; an exception there interrupts the run, which a
    later call with ``config.resume`` continues). The final routers go to
    ``out_dir`` (:meth:`Routers.save_pretrained`), the metrics history to
    ``out_dir/train_metrics.json``.

    Returns a dict: ``history`` (per epoch: ``lr``, ``train`` and ``val``
    metrics from :func:`classification_metrics`), ``final`` (the last
    entry), counts (``records``, ``default_labels``, ``shared_labels``, ``train``, ``val``),
    ``shared_skip`` (the block, or None), the label
    ``class_counts`` and ``class_weights``, ``extract`` (cache hits, computed,
    seconds), ``train_seconds``, ``resumed_from`` (epoch or None).

    One process at a time trains into ``out_dir`` (lock file ``OUT.lock``
    beside it): a second fails at once instead of overwriting checkpoints.
    """
    config = config or TrainConfig()
    out_dir = Path(out_dir)
    with exclusive_lock(out_dir):
        out_dir.mkdir(parents=True, exist_ok=True)
        if config.resume:
            _refuse_legacy_state(out_dir)
        return _train_routers(model, tokenizer, paths_file, out_dir, config, skips_file, callback)


def _train_routers(model, tokenizer, paths_file, out_dir: Path, config: TrainConfig, skips_file, callback) -> dict:
    info = describe(model)
    L = info.num_blocks

    probes = {r["id"]: r for r in read_records(skips_file)} if skips_file is not None else {}
    if any(r["num_blocks"] != L for r in probes.values()):
        raise ValueError(f"{skips_file}: skip probes of a model with another number of blocks than {L}")
    shared = shared_skip(list(probes.values()))
    records = load_path_records(paths_file, L, config.min_margin, shared, probes)
    if config.limit is not None:
        records = records[: config.limit]
    if not records:
        raise ValueError(f"{paths_file}: no search record to learn from")
    default_labels = sum(r["label"] == "1" * L for r in records)
    shared_labels = 0 if shared is None else sum(r["label"] == skip_paths(L)[shared] for r in records)

    # ---- features (cached)
    t0 = time.perf_counter()
    fingerprint = model_fingerprint(model)
    token_ids = [routing_tokens(tokenizer, r["prompt"], r.get("reward_mode")) for r in records]
    keys = [_feature_key(fingerprint, t, r["label"], config.num_windows) for t, r in zip(token_ids, records)]
    cache = FeatureCache(config.cache_dir or out_dir / "cache")
    missing = sorted({k: i for i, k in enumerate(keys) if k not in cache}.values())
    if missing:
        paths = torch.stack([path_from_str(records[i]["label"]) for i in missing])
        bar = _tqdm(config.progress, total=len(missing), desc="features", unit="ex")
        was_training = model.training
        model.eval()
        try:
            for idx, means, valid in extract_features(
                model, [token_ids[i] for i in missing], paths, config.num_windows,
                batch_size=config.extract_batch_size, progress=bar.update,
            ):
                stored = means.to(getattr(torch, config.cache_dtype))
                if not torch.isfinite(stored).all():
                    raise ValueError(
                        f"hidden-state means overflow {config.cache_dtype}: use TrainConfig(cache_dtype='float32')"
                    )
                cache.write({keys[missing[j]]: (stored[r], valid[r]) for r, j in enumerate(idx)})
        finally:
            model.train(was_training)
            bar.close()
    extract = {"examples": len(records), "cached": len(records) - len(missing), "computed": len(missing),
               "seconds": time.perf_counter() - t0}

    dtype = getattr(torch, config.cache_dtype)
    means, valid = cache.load(keys, dtype, block_major=True)  # [L, N, W, H]: a batch is one gather, then the matmul
    labels = torch.stack([path_from_str(r["label"]) for r in records])  # [N, L]
    train_idx, val_idx = _split(len(records), config.val_fraction, config.seed)
    tr = torch.tensor(train_idx)
    va = torch.tensor(val_idx, dtype=torch.long)
    device = torch.device(config.device)
    counts = torch.bincount(labels[tr].reshape(-1), minlength=3)
    weights = class_weights(labels[tr], config.beta).to(device)

    # ---- model, optimiser, schedule
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        routers = Routers(info.model_type, info.hidden_size, L, config.num_windows, config.router_hidden)
    routers.to(device).train()
    optimizer = torch.optim.AdamW(routers.parameters(), lr=config.lr, weight_decay=config.weight_decay, foreach=True)
    steps_per_epoch = math.ceil(len(train_idx) / config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    warmup = int(round(config.warmup_ratio * total_steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(total_steps, warmup, config.min_lr_ratio))

    data_id = hashlib.sha256(json.dumps([keys, train_idx]).encode()).hexdigest()
    signature = {"config": config.signature(), "data": data_id, "model": fingerprint}
    history: list[dict] = []
    start_epoch = 0
    resumed_from = None
    existing = _checkpoint_dirs(out_dir) if config.resume else []
    if existing:
        resumed_from, ckpt = existing[-1]
        history = _resume(ckpt, resumed_from, signature, routers, optimizer, scheduler)
        start_epoch = resumed_from
    write_json(out_dir / CONFIG_NAME, {**asdict(config), "paths_file": str(paths_file)})

    # ---- epochs
    t1 = time.perf_counter()
    bar = _tqdm(config.progress, total=config.epochs, initial=start_epoch, desc="train", unit="epoch")
    try:
        for epoch in range(start_epoch, config.epochs):
            routers.train()
            g = torch.Generator().manual_seed(config.seed * 1_000_003 + epoch)
            order = tr[torch.randperm(len(tr), generator=g)]
            preds, seen, total_loss = [], [], 0.0
            lr = optimizer.param_groups[0]["lr"]
            for s in range(steps_per_epoch):
                b = order[s * config.batch_size : (s + 1) * config.batch_size]
                x = means.index_select(1, b).to(device, torch.float32)
                y = labels[b].to(device).T  # [L, B], as the logits
                logits = _block_major_logits(routers, x, valid[b].to(device))
                loss = focal_loss(logits.reshape(-1, 3), y.reshape(-1), weights, config.gamma)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                total_loss += float(loss.detach()) * len(b)
                preds.append(logits.detach().argmax(-1).T.cpu())
                seen.append(b)
            train_m = classification_metrics(torch.cat(preds), labels[torch.cat(seen)], total_loss / len(tr))
            val_m = _evaluate_split(routers, means, valid, labels, va, weights, config, device)
            entry = {"epoch": epoch + 1, "lr": lr, "train": train_m, "val": val_m}
            history.append(entry)
            _save_checkpoint(out_dir, epoch + 1, routers, optimizer, scheduler,
                             {"epoch": epoch + 1, "history": history, "signature": signature},
                             config.keep_checkpoints)
            write_json(out_dir / METRICS_NAME, history)
            shown = val_m if val_m else train_m
            bar.set_postfix(loss=f"{train_m['loss']:.4f}", acc=f"{shown['accuracy']:.3f}",
                            f1=f"{shown['macro_f1']:.3f}", len=f"{shown['mean_pred_length']:.1f}")
            bar.update(1)
            if callback is not None:
                callback(epoch + 1, entry)
    finally:
        bar.close()
    train_seconds = time.perf_counter() - t1

    routers.cpu().save_pretrained(out_dir)
    return {
        "out_dir": str(out_dir),
        "records": len(records),
        "default_labels": default_labels,
        "shared_skip": shared,
        "shared_labels": shared_labels,
        "train": len(train_idx),
        "val": len(val_idx),
        "num_blocks": L,
        "class_counts": {n: int(c) for n, c in zip(CLASS_NAMES, counts)},
        "class_weights": {n: float(w) for n, w in zip(CLASS_NAMES, weights.cpu())},
        "extract": extract,
        "train_seconds": train_seconds,
        "resumed_from": resumed_from,
        "history": history,
        "final": history[-1] if history else None,
    }


@torch.no_grad()
def _evaluate_split(routers, means, valid, labels, idx, weights, config, device) -> dict | None:
    if len(idx) == 0:
        return None
    routers.eval()
    preds, total = [], 0.0
    for s in range(0, len(idx), max(config.batch_size, 256)):
        b = idx[s : s + max(config.batch_size, 256)]
        logits = _block_major_logits(routers, means.index_select(1, b).to(device, torch.float32), valid[b].to(device))
        total += float(focal_loss(logits.reshape(-1, 3), labels[b].to(device).T.reshape(-1), weights, config.gamma)) * len(b)
        preds.append(logits.argmax(-1).T.cpu())
    routers.train()
    return classification_metrics(torch.cat(preds), labels[idx], total / len(idx))
