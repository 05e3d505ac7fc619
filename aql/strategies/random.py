"""`random`: the control of data selection, a uniformly random `query_budget` share of the data each
epoch (a fresh draw per epoch, fixed by (seed, epoch)); no scores."""

from __future__ import annotations

from .base import EpochPlan, SelectionStrategy, register_strategy

__all__ = ["RandomStrategy"]


@register_strategy
class RandomStrategy(SelectionStrategy):
    """Each epoch the first `samples_per_epoch` entries of `epoch_permutation(num_samples, epoch)`: a
    uniform k-subset in random order. `uses_scores` is False (plain loss, no AQL machinery)."""

    name = "random"
    uses_scores = False

    def epoch_plan(self, epoch: int) -> EpochPlan:
        return self.host_plan(self.epoch_permutation(self.num_samples, epoch)[:self.samples_per_epoch])
