"""Features routers are trained on: the window means of the hidden state entering every block.

With the base model frozen and execution teacher-forced along an item's
labelled path, the state entering every block is a fixed function of the
item, and router ``i`` only ever sees it through the windowed means of the
prompt's tokens (:func:`drllm.ops.window_means`). So those means
``[L, num_windows, H]`` are computed once per (prompt, path) by a batched
forward (:func:`extract_features`) and kept on disk (:class:`FeatureCache`),
and every epoch, every candidate knob and every rerun reads them from there.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

from .. import ops
from ..batching import pad_batch
from ..paths import path_from_str
from ..runtime.adapters import describe

__all__ = ["FeatureCache", "extract_features", "feature_key", "cached_features"]


def feature_key(fingerprint: str, token_ids: Sequence[int], path: str, num_windows: int) -> str:
    """The cache key of one item's features: the model, the prompt's tokens, the path and the windows."""
    payload = json.dumps([fingerprint, list(map(int, token_ids)), path, int(num_windows)])
    return hashlib.sha256(payload.encode()).hexdigest()[:40]


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
    from ..runtime.control import forced_paths, observe

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


def cached_features(model: torch.nn.Module, cache: FeatureCache, keys: Sequence[str],
                    token_ids: Sequence[Sequence[int]], labels: Sequence[str], num_windows: int, *, dtype: str,
                    batch_size: int, progress: bool) -> dict:
    """Compute the features of every item whose key is not in ``cache`` yet (along its label path) and
    store them as ``dtype``; returns the counts and seconds, for the report."""
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    missing = sorted({k: i for i, k in enumerate(keys) if k not in cache}.values())
    if missing:
        paths = torch.stack([path_from_str(labels[i]) for i in missing])
        bar = tqdm(total=len(missing), desc="features", unit="ex", disable=not progress, dynamic_ncols=True)
        was_training = model.training
        model.eval()
        try:
            for idx, means, valid in extract_features(model, [token_ids[i] for i in missing], paths, num_windows,
                                                      batch_size=batch_size, progress=bar.update):
                stored = means.to(getattr(torch, dtype))
                if not torch.isfinite(stored).all():
                    raise ValueError(f"hidden-state means overflow {dtype}: use TrainConfig(cache_dtype='float32')")
                cache.write({keys[missing[j]]: (stored[r], valid[r]) for r, j in enumerate(idx)})
        finally:
            model.train(was_training)
            bar.close()
    return {"examples": len(keys), "cached": len(keys) - len(missing), "computed": len(missing),
            "seconds": time.perf_counter() - t0}
