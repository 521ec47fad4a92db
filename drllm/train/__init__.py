"""Router training from searched paths: teacher forcing on cached features, with a train/dev split.

- :mod:`~drllm.train.records`: the search's records as training reads them
  (paths, the prompt's token ids, the item);
- :mod:`~drllm.train.labels`: which path each item teaches, the train/dev
  split, and the thin-label rule;
- :mod:`~drllm.train.features`: window means of the hidden states along each
  label path, computed once and cached on disk;
- :mod:`~drllm.train.objective`: loss, class weights, logits, metrics, schedule;
- :mod:`~drllm.train.damage`: continuous damage targets (margin drop, KL to the
  full model, correctness) of candidate skip sets per item, for budget routers;
- :mod:`~drllm.train.budget`: budget routers fitted to damage targets (listwise ranking);
- :mod:`~drllm.train.checkpoints`: resumable per-epoch checkpoints
  (safetensors + JSON, never pickle);
- :mod:`~drllm.train.loop`: one training run (:func:`train_routers`).

Choosing ``min_margin`` and lambda on the dev part scores candidates, so it
lives in evaluation (:mod:`drllm.eval.selection`); train never imports eval.
"""

from .budget import BudgetConfig, damage_targets, fit_budget_routers, predict, tap_features
from .damage import damage_candidates, measure_damage, read_damage
from .features import FeatureCache, cached_features, extract_features, feature_key
from .labels import CLASS_NAMES, label_path, load_path_records, split_dev, train_shared_skip, trusted_labels
from .loop import TrainConfig, train_routers
from .objective import batched_router_logits, class_weights, classification_metrics, focal_loss
from .records import read_path_records, read_probes, record_example, record_tokens

__all__ = [
    "BudgetConfig",
    "CLASS_NAMES",
    "FeatureCache",
    "TrainConfig",
    "batched_router_logits",
    "cached_features",
    "class_weights",
    "classification_metrics",
    "damage_candidates",
    "damage_targets",
    "extract_features",
    "feature_key",
    "fit_budget_routers",
    "focal_loss",
    "label_path",
    "load_path_records",
    "measure_damage",
    "predict",
    "read_damage",
    "read_path_records",
    "read_probes",
    "record_example",
    "record_tokens",
    "split_dev",
    "tap_features",
    "train_routers",
    "train_shared_skip",
    "trusted_labels",
]
