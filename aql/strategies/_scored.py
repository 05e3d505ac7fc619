"""What the score-driven strategies (`online`, `ranked`) share: the ranking statistic, the class labels
of the per-class quotas, the stored irreducible losses of `score: reducible`, and building all three
from a config."""

from __future__ import annotations

import inspect

import torch

from aql._checks import check_bool, check_choice, check_int, check_tensor

from . import _keys
from .base import SelectionStrategy, StrategyContext

__all__ = ["ScoredStrategy"]


class ScoredStrategy(SelectionStrategy):
    """Base of the strategies that rank samples by a `_keys.SCORE_NAMES` statistic, optionally inside
    per-class quotas (`balanced`, needs `labels`) and optionally by reducible loss (needs `irreducible`)."""

    config_arguments = {**SelectionStrategy.config_arguments,
                        "labels": "the training data's targets",
                        "num_classes": "the training data's targets",
                        "irreducible": "a model trained on the validation split (score: reducible)",
                        }

    def _setup_scoring(self, score: str, balanced: bool, labels: torch.Tensor | None, num_classes: int | None,
                       irreducible: torch.Tensor | None) -> None:
        where = f"strategies.{type(self).__name__}"
        self.score = check_choice(where, "score", score, _keys.SCORE_NAMES)
        self.balanced = check_bool(where, "balanced", balanced)
        self.labels, self.num_classes = None, None
        if balanced:
            if labels is None:
                raise ValueError(f"aql.{where}: balanced=True needs labels (int64 [num_samples] class labels); "
                                 "pass balanced=False for data without labels")
            check_tensor(where, "labels", labels, ndim=1, dtypes=(torch.int64, torch.int32))
            if labels.shape[0] != self.num_samples:
                raise ValueError(f"aql.{where}: labels must have num_samples={self.num_samples} entries, got {labels.shape[0]}")
            self.labels = labels.to(self.device, torch.int64)
            self.num_classes = check_int(where, "num_classes", num_classes, low=1) if num_classes is not None \
                else int(self.labels.max()) + 1  # once, at construction
        self.irreducible = None
        if score == "reducible":
            if irreducible is None:
                raise ValueError(f"aql.{where}: score='reducible' needs irreducible (float32 [num_samples] irreducible losses, "
                                 "see aql.strategies.irreducible.irreducible_losses)")
            check_tensor(where, "irreducible", irreducible, ndim=1, dtypes=(torch.float32,))
            if irreducible.shape[0] != self.num_samples:
                raise ValueError(f"aql.{where}: irreducible must have num_samples={self.num_samples} entries, got {irreducible.shape[0]}")
            self.irreducible = irreducible.to(self.device)

    def _values(self, scores, indices: torch.Tensor) -> torch.Tensor:
        """The ranking statistic of `scores` (rows of dataset `indices`)."""
        return _keys.score_values(scores, self.score, self.irreducible, indices)

    def _quota_keys(self, keys: torch.Tensor, indices: torch.Tensor | None = None) -> torch.Tensor:
        """`keys` turned into per-class-quota keys when `balanced` (rows of dataset `indices`, all when None)."""
        if not self.balanced:
            return keys
        labels = self.labels if indices is None else self.labels.index_select(0, indices.to(self.device))
        return _keys.balanced_keys(keys, labels.to(keys.device), self.num_classes)

    @classmethod
    def from_config(cls, config, context: StrategyContext) -> ScoredStrategy:
        """`aql_v2.strategy_options` as keyword arguments; labels from the training data when `balanced`;
        for `score: reducible`, irreducible losses from a model of `config.model` trained on the
        validation split (the trainer's holdout)."""
        options = dict(config.aql_v2.strategy_options)
        defaults = inspect.signature(cls.__init__).parameters
        balanced = options.get("balanced", defaults["balanced"].default)
        score = options.get("score", defaults["score"].default)
        irreducible = None
        if score == "reducible":
            from aql.models import build_model

            from .irreducible import irreducible_losses

            irreducible = irreducible_losses(context.train_data, context.holdout_data, seed=config.seed,
                                             model_factory=lambda: build_model(config.model))
        return cls(context.num_samples, query_budget=config.aql_v2.query_budget, seed=config.seed, device=context.device,
                   labels=context.labels if balanced else None, num_classes=context.num_classes, irreducible=irreducible, **options)
