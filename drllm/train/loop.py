"""One training run: routers for one set of knobs, from the search's records, on cached features.

- data: the records are split into a train and a dev part (seeded); labels
  follow :mod:`drllm.train.labels` (the shared skip and the thin-label rule
  read the train part only);
- loss: focal loss (gamma 2) with effective-number class weights (beta 0.999)
  computed from the train part's labels of all blocks together;
- AdamW (lr 1e-3, weight decay 0.01), linear warmup then cosine decay, per step;
- per epoch, per-layer accuracy, per-class precision / recall / F1, macro F1
  and mean predicted path length on both parts; the routers kept are those of
  the epoch with the lowest dev loss (the last epoch without a dev part);
- a checkpoint per epoch (:mod:`drllm.train.checkpoints`), so an interrupted
  run resumes from the last complete epoch and ends with exactly the routers
  of an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable

import torch

from ..artifacts import exclusive_lock, model_fingerprint, write_json
from ..paths import path_from_str, path_to_str
from ..routing import Routers
from ..runtime.adapters import describe
from ..search import single_skip_paths
from . import checkpoints as ck
from .features import FeatureCache, cached_features, feature_key
from .labels import CLASS_NAMES, label_path, split_dev, train_shared_skip, trusted_labels
from .objective import block_major_logits, class_weights, classification_metrics, focal_loss, lr_lambda
from .records import read_path_records, read_probes, record_tokens

__all__ = ["TrainConfig", "train_routers"]

METRICS_NAME = "train_metrics.json"
CONFIG_NAME = "train_config.json"


@dataclass
class TrainConfig:
    """Hyper-parameters and bookkeeping of :func:`train_routers`.

    ``batch_size`` counts examples per optimisation step (each example gives
    one label per block). ``warmup_ratio`` is the fraction of all steps spent
    in the linear warmup; the cosine then decays to ``min_lr_ratio * lr``.
    ``dev_fraction`` of the records (seeded by ``seed``) form the dev part,
    on which the epoch is kept (and :func:`drllm.eval.selection.select_routers`
    chooses the other knobs); it is never trained on.
    ``min_margin``: a searched path is learned only if the gold answer wins
    by at least this much normalised log-likelihood (:func:`label_path`); 0
    learns every correct path. ``min_block_labels``: a skip or repeat is
    learned at a block only when at least this many train items teach it
    there (:func:`drllm.train.trusted_labels`); fewer teach execute.
    ``extract_batch_size`` prompts go through the base model per forward.
    ``cache_dtype`` (``float16`` or ``float32``) is how the window means are
    stored; ``cache_dir`` defaults to ``<out_dir>/cache``. With ``resume``,
    a run whose ``out_dir`` holds a checkpoint of the same configuration and
    data continues from it; without, it starts over. ``limit`` keeps the
    first N records.
    """

    epochs: int = 25
    min_margin: float = 0.2
    min_block_labels: int = 8
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_ratio: float = 0.05
    min_lr_ratio: float = 0.0
    gamma: float = 2.0
    beta: float = 0.999
    dev_fraction: float = 0.2
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
        if not 0.0 <= self.dev_fraction < 1.0:
            raise ValueError(f"dev_fraction must be in [0, 1), got {self.dev_fraction}")
        if self.min_margin < 0:
            raise ValueError(f"min_margin must be >= 0, got {self.min_margin}")
        if self.min_block_labels < 0:
            raise ValueError(f"min_block_labels must be >= 0, got {self.min_block_labels}")
        if not 0.0 <= self.beta < 1.0:
            raise ValueError(f"beta must be in [0, 1), got {self.beta}")
        if self.cache_dtype not in ("float16", "float32"):
            raise ValueError(f"cache_dtype must be 'float16' or 'float32', got {self.cache_dtype!r}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")

    def signature(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in self._BOOKKEEPING}


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
    """Train routers for ``model`` from the search records in ``paths_file``; write them to ``out_dir``.

    Each record teaches :func:`label_path` with ``config.min_margin``; with
    ``skips_file`` (written by :func:`drllm.search.probe_skips`), records
    without a decisive path teach the skip the train part's probes share
    (:func:`drllm.train.train_shared_skip`) where their own probe allows.
    Features are read from (or added to) the cache, then ``config.epochs``
    epochs run on it. After each epoch a checkpoint is written and
    ``callback(epoch, metrics)`` is called (1-based epoch; an exception there
    interrupts the run, which a later call with ``config.resume`` continues).
    The kept routers go to ``out_dir`` (:meth:`Routers.save_pretrained`), the
    metrics history to ``out_dir/train_metrics.json``.

    Returns a dict: ``history`` (per epoch: ``lr``, ``train`` and ``dev``
    metrics from :func:`classification_metrics`), ``epoch`` (the one kept)
    and ``final`` (its entry), counts (``records``, ``default_labels``,
    ``shared_labels``, ``train``, ``dev``), ``dev_ids``, ``shared_skip`` (the
    block, or None), ``thin_labels`` ((block, decision) pairs turned into
    execute), the label ``class_counts`` and ``class_weights``, ``extract``
    (cache hits, computed, seconds), ``train_seconds``, ``resumed_from``
    (epoch or None).

    One process at a time trains into ``out_dir`` (lock file ``OUT.lock``
    beside it): a second fails at once instead of overwriting checkpoints.
    """
    config = config or TrainConfig()
    out_dir = Path(out_dir)
    with exclusive_lock(out_dir):
        out_dir.mkdir(parents=True, exist_ok=True)
        if config.resume:
            ck.refuse_legacy_state(out_dir)
        return _train_routers(model, tokenizer, paths_file, out_dir, config, skips_file, callback)


def _labelled(paths_file, skips_file, L: int, config: TrainConfig) -> dict:
    """The records, their train/dev split and their labels (every rule reading the train part only)."""
    records = read_path_records(paths_file, L)[: config.limit]
    if not records:
        raise ValueError(f"{paths_file}: no search record to learn from")
    train_idx, dev_idx = split_dev(len(records), config.dev_fraction, config.seed)
    probes = read_probes(skips_file, L) if skips_file is not None else {}
    shared = train_shared_skip(probes, [records[i].get("id") for i in train_idx])
    searched = torch.stack([path_from_str(label_path(r, config.min_margin, shared, probes.get(r.get("id"))))
                            for r in records])
    labels, thin = trusted_labels(searched, train_idx, config.min_block_labels)
    return {"records": records, "train_idx": train_idx, "dev_idx": dev_idx, "shared": shared, "labels": labels,
            "thin": thin}


def _train_routers(model, tokenizer, paths_file, out_dir: Path, config: TrainConfig, skips_file, callback) -> dict:
    info = describe(model)
    L = info.num_blocks
    data = _labelled(paths_file, skips_file, L, config)
    records, labels, train_idx, dev_idx = data["records"], data["labels"], data["train_idx"], data["dev_idx"]
    label_strs = [path_to_str(p) for p in labels]
    default_labels = sum(s == "1" * L for s in label_strs)
    shared_labels = 0 if data["shared"] is None else label_strs.count(single_skip_paths(L)[data["shared"]])

    # ---- features (cached)
    fingerprint = model_fingerprint(model)
    token_ids = [record_tokens(r, tokenizer) for r in records]
    keys = [feature_key(fingerprint, t, s, config.num_windows) for t, s in zip(token_ids, label_strs)]
    cache = FeatureCache(config.cache_dir or out_dir / "cache")
    extract = cached_features(model, cache, keys, token_ids, label_strs, config.num_windows, dtype=config.cache_dtype,
                              batch_size=config.extract_batch_size, progress=config.progress)
    means, valid = cache.load(keys, getattr(torch, config.cache_dtype), block_major=True)  # [L, N, W, H]
    tr = torch.tensor(train_idx)
    dev = torch.tensor(dev_idx, dtype=torch.long)
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
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(total_steps, warmup, config.min_lr_ratio))

    data_id = hashlib.sha256(json.dumps([keys, train_idx]).encode()).hexdigest()
    signature = {"config": config.signature(), "data": data_id, "model": fingerprint}
    history: list[dict] = []
    start_epoch = 0
    resumed_from = None
    existing = ck.checkpoint_dirs(out_dir) if config.resume else []
    if existing:
        resumed_from, ckpt = existing[-1]
        history = ck.resume(ckpt, resumed_from, signature, routers, optimizer, scheduler)
        start_epoch = resumed_from
    write_json(out_dir / CONFIG_NAME, {**asdict(config), "paths_file": str(paths_file)})

    # ---- epochs
    from tqdm.auto import tqdm

    t1 = time.perf_counter()
    bar = tqdm(total=config.epochs, initial=start_epoch, desc="train", unit="epoch", disable=not config.progress,
               dynamic_ncols=True)
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
                logits = block_major_logits(routers, x, valid[b].to(device))
                loss = focal_loss(logits.reshape(-1, 3), y.reshape(-1), weights, config.gamma)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                total_loss += float(loss.detach()) * len(b)
                preds.append(logits.detach().argmax(-1).T.cpu())
                seen.append(b)
            train_m = classification_metrics(torch.cat(preds), labels[torch.cat(seen)], total_loss / len(tr))
            dev_m = _evaluate_split(routers, means, valid, labels, dev, weights, config, device)
            entry = {"epoch": epoch + 1, "lr": lr, "train": train_m, "dev": dev_m}
            history.append(entry)
            if _kept_epoch(history) == epoch + 1:
                ck.save_best(out_dir, routers)
            ck.save_checkpoint(out_dir, epoch + 1, routers, optimizer, scheduler,
                               {"epoch": epoch + 1, "history": history, "signature": signature},
                               config.keep_checkpoints)
            write_json(out_dir / METRICS_NAME, history)
            shown = dev_m if dev_m else train_m
            bar.set_postfix(loss=f"{train_m['loss']:.4f}", acc=f"{shown['accuracy']:.3f}",
                            f1=f"{shown['macro_f1']:.3f}", len=f"{shown['mean_pred_length']:.1f}")
            bar.update(1)
            if callback is not None:
                callback(epoch + 1, entry)
    finally:
        bar.close()
    train_seconds = time.perf_counter() - t1

    kept = _kept_epoch(history)
    Routers.from_pretrained(ck.best_dir(out_dir)).save_pretrained(out_dir)
    return {
        "out_dir": str(out_dir),
        "records": len(records),
        "default_labels": default_labels,
        "shared_skip": data["shared"],
        "shared_labels": shared_labels,
        "thin_labels": data["thin"],
        "train": len(train_idx),
        "dev": len(dev_idx),
        "dev_ids": [records[i].get("id") for i in dev_idx],
        "num_blocks": L,
        "class_counts": {n: int(c) for n, c in zip(CLASS_NAMES, counts)},
        "class_weights": {n: float(w) for n, w in zip(CLASS_NAMES, weights.cpu())},
        "extract": extract,
        "train_seconds": train_seconds,
        "resumed_from": resumed_from,
        "history": history,
        "epoch": kept,
        "final": history[kept - 1],
    }


def _kept_epoch(history: list[dict]) -> int:
    """The epoch whose routers are kept: the lowest dev loss (the earliest of ties); the last without dev."""
    if history[-1]["dev"] is None:
        return history[-1]["epoch"]
    return min(history, key=lambda e: (e["dev"]["loss"], e["epoch"]))["epoch"]


@torch.no_grad()
def _evaluate_split(routers, means, valid, labels, idx, weights, config, device) -> dict | None:
    if len(idx) == 0:
        return None
    routers.eval()
    preds, total = [], 0.0
    for s in range(0, len(idx), max(config.batch_size, 256)):
        b = idx[s : s + max(config.batch_size, 256)]
        logits = block_major_logits(routers, means.index_select(1, b).to(device, torch.float32), valid[b].to(device))
        total += float(focal_loss(logits.reshape(-1, 3), labels[b].to(device).T.reshape(-1), weights, config.gamma)) * len(b)
        preds.append(logits.argmax(-1).T.cpu())
    routers.train()
    return classification_metrics(torch.cat(preds), labels[idx], total / len(idx))
