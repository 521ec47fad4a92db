"""What training minimises and reports: focal loss with class weights, router logits on cached features,
classification metrics and the learning-rate schedule.

The router logits used in training are those of inference: for each block
the router MLP is applied to every valid window mean and the logits are
averaged (:func:`drllm.ops.pooled_router_logits_reference`), computed for all
blocks at once with batched matrix products.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..routing import Routers
from .labels import CLASS_NAMES

__all__ = ["class_weights", "focal_loss", "batched_router_logits", "block_major_logits", "classification_metrics",
           "lr_lambda"]


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
    return block_major_logits(routers, means.float().transpose(0, 1), valid).transpose(0, 1)


def block_major_logits(routers: Routers, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
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


def lr_lambda(total_steps: int, warmup_steps: int, min_ratio: float):
    """Per-step learning-rate factor: linear warmup over ``warmup_steps``, then cosine decay to ``min_ratio``."""
    def fn(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return fn
