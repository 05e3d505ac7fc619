"""What the score-driven strategies (`online`, `ranked`) share: the ranking statistic, the class labels
of the per-class quotas, the stored irreducible losses of `score: reducible`, and building all three
from a config."""

from __future__ import annotations

import inspect

import torch

from aql._checks import check_bool, check_choice, check_int, check_tensor

from . import _keys
from .base import SelectionStrategy, StrategyContext

__all__ = ["ScoredStrategy", "UNCERTAINTY"]

#: the `score` of a strategy ranked by an external candidate scorer (e.g. an uncertainty estimator's
#: `estimate_uncertainty` of the candidates), for the strategies that take one (`online`)
UNCERTAINTY = "uncertainty"


class ScoredStrategy(SelectionStrategy):
    """Base of the strategies that rank samples by a `_keys.SCORE_NAMES` statistic, optionally inside
    per-class quotas (`balanced`, needs `labels`) and optionally by reducible loss (needs `irreducible`)."""

    config_arguments = {**SelectionStrategy.config_arguments,
                        "labels": "the training data's targets",
                        "num_classes": "the training data's targets",
                        "irreducible": "a model trained on the validation split (score: reducible)",
                        "candidate_scorer": "aql_v2.scorer (estimator: score uncertainty)",
                        }

    #: whether `score="uncertainty"` (a `candidate_scorer`) is accepted: only for strategies that score
    #: candidates before the step (a stale store would need a scoring pass of its own)
    takes_candidate_scorer = False

    def _setup_scoring(self, score: str, balanced: bool, labels: torch.Tensor | None, num_classes: int | None,
                       irreducible: torch.Tensor | None, candidate_scorer=None) -> None:
        where = f"strategies.{type(self).__name__}"
        names = (*_keys.SCORE_NAMES, UNCERTAINTY) if self.takes_candidate_scorer else _keys.SCORE_NAMES
        self.score = check_choice(where, "score", score, names)
        if (score == UNCERTAINTY) != (candidate_scorer is not None):
            raise ValueError(f"aql.{where}: score='uncertainty' and candidate_scorer go together (a callable indices -> "
                             f"float32 [B] scores, e.g. aql_v2.scorer: estimator), got score={score!r} and candidate_scorer="
                             f"{type(candidate_scorer).__name__}")
        if candidate_scorer is not None and not callable(candidate_scorer):
            raise TypeError(f"aql.{where}: candidate_scorer must be callable (indices -> float32 [B] scores), "
                            f"got {type(candidate_scorer).__name__}")
        self.candidate_scorer = candidate_scorer
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
        """The ranking statistic of `scores` (rows of dataset `indices`); for `score="uncertainty"` the
        candidate scorer's values of those rows instead (higher = more informative)."""
        if self.score == UNCERTAINTY:
            values = self.candidate_scorer(indices)
            if not isinstance(values, torch.Tensor) or values.shape != indices.shape:
                raise ValueError(f"aql.strategies.{type(self).__name__}: candidate_scorer must return one score per index "
                                 f"(shape {tuple(indices.shape)}), got "
                                 f"{tuple(values.shape) if isinstance(values, torch.Tensor) else type(values).__name__}")
            return values.float().to(scores.lse.device)
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
        validation split (the trainer's holdout). With `aql_v2.scorer: estimator` a strategy that takes
        a candidate scorer ranks by the estimator's uncertainty (`score` defaults to "uncertainty")."""
        options = dict(config.aql_v2.strategy_options)
        defaults = inspect.signature(cls.__init__).parameters
        balanced = options.get("balanced", defaults["balanced"].default)
        if cls.takes_candidate_scorer:
            from aql.training.batches import config_scorer

            scorer = config_scorer(config, context)
            if scorer is not None:
                options.setdefault("score", UNCERTAINTY)
            if options.get("score") == UNCERTAINTY:
                if scorer is None:
                    from aql.config import ConfigError

                    raise ConfigError("aql_v2.strategy_options.score: 'uncertainty' ranks by the estimator; set "
                                      "aql_v2.scorer: estimator")
                options["candidate_scorer"] = scorer
        score = options.get("score", defaults["score"].default)
        irreducible = None
        if score == "reducible":
            from aql.models import build_model

            from .irreducible import irreducible_losses

            irreducible = irreducible_losses(context.train_data, context.holdout_data, seed=config.seed,
                                             model_factory=lambda: build_model(config.model))
        return cls(context.num_samples, query_budget=config.aql_v2.query_budget, seed=config.seed, device=context.device,
                   labels=context.labels if balanced else None, num_classes=context.num_classes, irreducible=irreducible, **options)
