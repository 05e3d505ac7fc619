"""`none`: the baseline, every sample every epoch in a fresh random order; no scores, no selection."""

from __future__ import annotations

import torch

from .base import EpochPlan, SelectionStrategy, StrategyContext, register_strategy

__all__ = ["AllDataStrategy"]


@register_strategy
class AllDataStrategy(SelectionStrategy):
    """All `num_samples` samples each epoch, in the order `epoch_permutation(num_samples, epoch)`.

    `uses_scores` is False: a loop trains with plain `F.cross_entropy` and runs no AQL machinery (the
    trainer builds no estimator and times nothing as overhead). The query budget is 1 whatever
    `aql_v2.query_budget` says.
    """

    name = "none"
    uses_scores = False

    def __init__(self, num_samples: int, *, seed: int = 0, device: torch.device | str = "cpu"):
        super().__init__(num_samples, query_budget=1.0, seed=seed, device=device)

    def epoch_plan(self, epoch: int) -> EpochPlan:
        return self.host_plan(self.epoch_permutation(self.num_samples, epoch))

    @classmethod
    def from_config(cls, config, context: StrategyContext) -> AllDataStrategy:
        return cls(context.num_samples, seed=config.seed, device=context.device, **config.aql_v2.strategy_options)
